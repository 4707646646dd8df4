"""dptrain: data-parallel CNN training on CPU clusters, in NumPy, over ZeroMQ."""
from pathlib import Path

__version__ = "0.1.0"


def install_hint(extra: str) -> str:
    """The command that installs an optional extra, in the form that fits how dptrain itself was installed: an
    editable install from a source checkout (`make venv`) gets `pip install -e '.[extra]'`, a package install
    `pip install 'dptrain[extra]'`."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "dptrain" / "cli.py").is_file():
        return f"pip install -e '{checkout}[{extra}]'" if Path.cwd() != checkout else f"pip install -e '.[{extra}]'"
    return f"pip install 'dptrain[{extra}]'"
