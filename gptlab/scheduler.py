"""Schedules for learning rate, weight decay and gradient accumulation, and early stopping.

Every schedule has the same shape: start at `begin`, warm up linearly to `peak` over the first
`warmup` fraction of the run, decay to `end` over a further `decay` fraction, then hold `end`.
Progress is the fraction of the run's tokens trained, so a growing batch does not stretch it.
"""

import math
from dataclasses import dataclass

STYLES = ("constant", "linear", "cosine", "power", "wsd")


@dataclass
class ScheduleConfig:
    peak: float = 0.0
    """Value after the warmup (and the whole run for style 'constant')."""
    begin: float | None = None
    """Value at the first step; null means peak (no warmup ramp)."""
    end: float | None = None
    """Value after the decay; null means peak. Not allowed with style 'constant'."""
    warmup: float = 0.0
    """Fraction of the run spent going from begin to peak."""
    decay: float = 1.0
    """Fraction of the run spent going from peak to end: right after the warmup, or for 'wsd' the final fraction."""
    style: str = "constant"
    """Decay shape: constant, linear, cosine, power, or wsd (warmup-stable-decay: hold peak, decay linearly at the end)."""
    exponent: float = 2.0
    """Style 'power': value = end + (peak - end) * (1 - q) ** exponent, q the decay progress."""

    @property
    def first(self) -> float:
        return self.peak if self.begin is None else self.begin

    @property
    def last(self) -> float:
        return self.peak if self.end is None else self.end

    def problems(self, name: str, minimum: float = 0.0) -> list[str]:
        """Everything wrong with this schedule, as messages naming the fix."""
        found = []
        if self.style not in STYLES:
            found.append(f"{name}.style is {self.style!r}; use one of {', '.join(STYLES)}")
        for key, value in (("peak", self.peak), ("begin", self.first), ("end", self.last)):
            if not value >= minimum:  # also catches NaN
                found.append(f"{name}.{key} is {value}; it must be at least {minimum}")
        for key in ("warmup", "decay"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                found.append(f"{name}.{key} is {getattr(self, key)}; it must be in [0, 1]")
        if self.warmup + self.decay > 1.0 + 1e-9 and self.style != "constant":
            found.append(
                f"{name}.warmup + {name}.decay is {self.warmup + self.decay}; it must not exceed 1"
            )
        if self.style == "constant" and self.end is not None and self.end != self.peak:
            found.append(f"{name}.end is set but style 'constant' never decays; pick a decay style")
        if not self.exponent > 0:
            found.append(f"{name}.exponent must be positive")
        return found

    def value(self, progress: float) -> float:
        """The scheduled value at `progress`, the fraction of the run done (clipped to [0, 1])."""
        p = min(max(progress, 0.0), 1.0)
        if p < self.warmup:
            return self.first + (self.peak - self.first) * p / self.warmup
        if self.style == "constant":
            return self.peak
        # q: how far through the decay window; wsd's window ends exactly at the end of the run.
        if self.decay == 0.0:
            start = 1.0 if self.style == "wsd" else self.warmup
            q = 1.0 if p >= start else 0.0
        elif self.style == "wsd":
            q = min(max(1.0 - (1.0 - p) / self.decay, 0.0), 1.0)
        else:
            q = min(max((p - self.warmup) / self.decay, 0.0), 1.0)
        peak, end = self.peak, self.last
        if q <= 0.0 or q >= 1.0:  # exactly peak and exactly end at the ends of the decay
            return peak if q <= 0.0 else end
        if self.style == "cosine":
            return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * q))
        if self.style == "power":
            return end + (peak - end) * (1.0 - q) ** self.exponent
        return end + (peak - end) * (1.0 - q)  # linear and wsd


@dataclass
class StepSettings:
    """What the schedules say for one optimizer step."""

    lr: float
    weight_decay: float
    grad_accum: int


@dataclass
class RunSchedules:
    lr: ScheduleConfig
    weight_decay: ScheduleConfig
    grad_accum: ScheduleConfig
    total_tokens: int

    def at(self, tokens_trained: int) -> StepSettings:
        """Settings for the step that starts after `tokens_trained` tokens: the first step gets begin."""
        progress = tokens_trained / self.total_tokens
        return StepSettings(
            lr=self.lr.value(progress),
            weight_decay=self.weight_decay.value(progress),
            grad_accum=max(1, round(self.grad_accum.value(progress))),
        )


@dataclass
class EarlyStopConfig:
    patience: int = 0
    """Stop after this many evaluations in a row without improvement; 0 turns early stopping off."""
    min_delta: float = 0.0
    """An evaluation improves only if val loss falls below the best by more than this."""


@dataclass
class EarlyStopping:
    config: EarlyStopConfig
    best: float = math.inf
    evals_without_improvement: int = 0

    def update(self, val_loss: float) -> str | None:
        """Record one evaluation; return why the run should stop, or None to go on."""
        if val_loss < self.best - self.config.min_delta:
            self.best = val_loss
            self.evals_without_improvement = 0
            return None
        self.evals_without_improvement += 1
        if self.config.patience and self.evals_without_improvement >= self.config.patience:
            return (
                f"early stop: val loss has not improved on {self.best:.4f} by more than "
                f"{self.config.min_delta} for {self.evals_without_improvement} evaluations"
            )
        return None

    def state_dict(self) -> dict:
        return {"best": self.best, "evals_without_improvement": self.evals_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.evals_without_improvement = state["evals_without_improvement"]
