"""gptlab's machinery: the scripts at the repository root are thin entry points over this package.

Each module has one job; `models/` (the networks) imports nothing from here but `errors`.
"""
