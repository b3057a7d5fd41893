"""torch's exception types for the kernels' errors.

Across the LibTorch stable ABI a C++ exception reaches Python as RuntimeError carrying its
message. The kernels tag the message of an error that torch raises as another type
("[fastce:IndexError] Target 7 is out of bounds."); ``fastce._ops.call`` re-raises it as that
type with the tag removed, so fastce raises what ``torch.nn.functional.cross_entropy`` does.
"""
import re

_TAG = re.compile(r"\[fastce:(ValueError|IndexError|TypeError|NotImplementedError)\] ")
_TYPES = {"ValueError": ValueError, "IndexError": IndexError, "TypeError": TypeError,
          "NotImplementedError": NotImplementedError}


def retyped(error):
    """The exception torch raises for a kernel's RuntimeError, or None when it is untagged."""
    message = str(error)
    tag = _TAG.search(message)
    if tag is None:
        return None
    # the kernel's message is one line; torch may add context lines after it
    return _TYPES[tag.group(1)](message[tag.end():].split("\n", 1)[0])


def raise_as_torch(error, torch_call):
    """Raises what the running torch raises for the same call (``torch_call``), else ``error``.

    For an argument error of the public API: torch's wording and the order of its checks vary
    between versions (torch 2.11 says "expected scalar type Long but found Float" where 2.13
    says "expected target dtype to be Long or Byte, but got Float"), and a drop-in raises what
    the torch it runs with raises. Runs on the error path only."""
    if "out of memory" in str(error):
        raise error
    import torch
    try:
        with torch.no_grad():
            torch_call()
    except Exception as theirs:  # torch's own exception, as torch raised it
        raise theirs.with_traceback(None) from None
    raise error
