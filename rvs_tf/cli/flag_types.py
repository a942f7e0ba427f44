"""absl flag types shared by the entry points."""
from fractions import Fraction

from absl import flags


class FractionParser(flags.FloatParser):
    """A float flag that also takes fractions, so flag files can say `--eps=8/255` as papers do."""

    def convert(self, argument):
        if isinstance(argument, str) and "/" in argument:
            try:
                return float(Fraction(argument.strip()))
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"expected a number or a fraction like 8/255, got {argument!r}") from None
        return super().convert(argument)


def DEFINE_fraction(name, default, help, lower=None, upper=None, **kwargs):  # noqa: N802 (absl style)
    """A float/fraction flag with optional inclusive bounds checked at parse time."""
    parser = FractionParser(lower_bound=lower, upper_bound=upper)
    return flags.DEFINE(parser, name, default, help, serializer=flags.ArgumentSerializer(), **kwargs)
