"""Bad input is named before anything trains: identity that ignores docstrings, axis names that collide with
result fields or engine keys, path names (EXPT_NAME, JOB_ID), batch and model outputs checked at step 0."""
import numpy as np
import pytest
import torch

from modelscape.backend.identity import code_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --- identity: a docstring is not code ---------------------------------------------------------------------

def _compile(src, name):
    space = {}
    exec(compile(src, f"<{name}>", "exec"), space)
    return space[name]


GRAB = "def grab(model, **kw):\n{doc}    def inner(x):\n{idoc}        return x + 1\n    return inner(2.5)\n"


@pytest.mark.parametrize("doc, idoc", [('    """What it measures."""\n', ""), ("", '        """Inner."""\n'),
                                       ('    """A."""\n', '        """B."""\n')])
def test_adding_a_docstring_to_a_grab_keeps_its_identity(doc, idoc):
    bare = _compile(GRAB.format(doc="", idoc=""), "grab")
    documented = _compile(GRAB.format(doc=doc, idoc=idoc), "grab")
    assert code_fingerprint(bare) == code_fingerprint(documented)


def test_a_string_the_code_uses_still_counts():
    first = _compile('def grab(model, **kw):\n    return len("abc")\n', "grab")
    second = _compile('def grab(model, **kw):\n    return len("abcd")\n', "grab")
    documented = _compile('def grab(model, **kw):\n    """Counts."""\n    return len("abc")\n', "grab")
    assert code_fingerprint(first) != code_fingerprint(second)
    assert code_fingerprint(first) == code_fingerprint(documented)
