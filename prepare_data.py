"""Turn a corpus or a synthetic task into token files that train.py reads through np.memmap.

    python prepare_data.py shakespeare_char [--input input.txt]
    python prepare_data.py adder [--digits 3]
    python prepare_data.py multiplier [--digits 2]
    python prepare_data.py text --input corpus.txt --tokenizer char|DIR|HUB_NAME [--name NAME]
    python prepare_data.py classify --input reviews.csv [--text_column review --label_column label]

Each writes data/<name>/ (or --out_dir): meta.json, tokenizer.json, <split>.bin files and a
manifest. The tokenizer travels with the data and then with every checkpoint, so nothing needs the
corpus again. A directory is built under a temporary name and renamed when complete; only an
absent or empty directory is written, and an existing data set is replaced only with --overwrite.
"""

import json
from pathlib import Path

from gptlab import tasks
from gptlab.cli import ArgumentParser
from gptlab.errors import run_cli


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="dataset", required=True, parser_class=ArgumentParser)
    for module in tasks.MODULES:
        for name, help_text in module.COMMANDS.items():
            command = commands.add_parser(name, help=help_text)
            module.add_arguments(command, name)
            command.add_argument("--out_dir", help="output directory (default: data/<name>)")
            command.add_argument("--overwrite", action="store_true", help="replace a data set")
    args = parser.parse_args(argv)

    name = getattr(args, "name", None) or args.dataset
    out_dir = Path(args.out_dir or f"data/{name}")
    tasks.for_command(args.dataset).prepare(args.dataset, args, out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    print(f"wrote {out_dir}: vocabulary {meta['vocab_size']}, splits {meta['splits']}")


if __name__ == "__main__":
    run_cli(main)
