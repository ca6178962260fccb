"""Ray, submitit, tensorboard and scikit-learn are optional: importing modelscape never imports them, and asking for a backend whose
package is missing is a one-line ConfigError naming the extra to install."""
import subprocess
import sys

import pytest

from modelscape.backend.executors import make_executor
from modelscape.backend.job_iterator import main
from modelscape.config import ConfigError


def test_importing_modelscape_needs_neither():
    code = ("import sys, modelscape, modelscape.backend.job_iterator, modelscape.backend.executors, modelscape.cli; "
            "print(sorted(m for m in ('ray', 'submitit', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["ray", "submitit"])
def test_missing_package_names_the_extra(module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # import now fails as if it were not installed
    extra = {"ray": "ray", "submitit": "slurm"}[module]
    with pytest.raises(ConfigError, match=rf"^EXECUTOR='{extra}' needs the package '{module}', which is not "
                       rf"installed: pip install -e '\.\[{extra}\]' in modelscape's folder$"):
        if module == "ray":
            make_executor("ray")
        else:
            main([[8]], ["WIDTH"], {"EXECUTOR": "slurm", "MAX_ITER": 1}, {"base_bfn": lambda **kw: None},
                 store=tmp_path / "s", progress=False)


def test_the_digits_data_without_scikit_learn_names_the_extra(monkeypatch):
    from modelscape.data import digits
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    digits._raw.cache_clear()
    digits._pools.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"^the digits data needs the package 'sklearn.datasets', which is not "
                           r"installed: pip install -e '\.\[examples\]' in modelscape's folder$"):
            digits.digits_test_set()
    finally:
        digits._raw.cache_clear()
        digits._pools.cache_clear()
