"""torch's exception types for the kernels' errors.

Across the LibTorch stable ABI a C++ exception reaches Python as RuntimeError carrying its
message. The kernels tag the message of an error that torch raises as another type
("[fastce:IndexError] Target 7 is out of bounds."); ``torch_errors`` re-raises it as that
type with the tag removed, so fastce raises what ``torch.nn.functional.cross_entropy`` does.
"""
import re

_TAG = re.compile(r"\[fastce:(ValueError|IndexError|TypeError|NotImplementedError)\] ")
_TYPES = {"ValueError": ValueError, "IndexError": IndexError, "TypeError": TypeError,
          "NotImplementedError": NotImplementedError}


def _retyped(error):
    message = str(error)
    tag = _TAG.search(message)
    if tag is None:
        return None
    # torch may append context after the message (e.g. the op's name): keep what follows.
    return _TYPES[tag.group(1)](message[tag.end():].split("\n", 1)[0] if "\n" in message[tag.end():]
                                else message[tag.end():])


class torch_errors:
    """Context manager: re-raises the kernels' tagged RuntimeErrors as torch's types."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is RuntimeError:
            retyped = _retyped(error)
            if retyped is not None:
                raise retyped from None
        return False
