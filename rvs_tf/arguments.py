"""Argument checks shared by the library modules, so they refuse bad values alike and word the error the
same way: "name: expected ..., got ..."."""
import numbers


def check_int(name, value, minimum):
    """`value` if it is an integer (Python or NumPy) >= `minimum`; bools are refused (True is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def check(condition, message):
    """Raise ValueError(message) unless `condition`: the one-line form of the checks above, for the
    constructors' many argument checks (the message names the argument: "name: expected ..., got ...")."""
    if not condition:
        raise ValueError(message)
