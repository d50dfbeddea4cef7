"""The scripts refuse bad arguments up front, before any model or corpus work."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in a script look their module up
    spec.loader.exec_module(module)
    return module


def _refused(main, argv, capsys, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_never_replaces_a_non_empty_out_unasked(tmp_path, capsys):
    demo = _load("demo")
    (tmp_path / "important.txt").write_text("keep")
    _refused(demo.main, ["--out", str(tmp_path)], capsys, "pass --overwrite")
    assert (tmp_path / "important.txt").read_text() == "keep"
    _refused(demo.main, ["--steps", "0"], capsys, "--steps must be at least 1")


@pytest.mark.parametrize("argv,message", [
    (["--families", "foo"], "unknown families ['foo']"),
    (["--dtypes", "fp16"], "unsupported dtypes ['fp16']"),
    (["--families", "mixtral", "--dtypes", "bfloat16"], "nothing to run"),
    (["--steps", "0", "--device", "cpu"], "--steps must be at least 1"),
])
def test_convergence_arguments(argv, message, capsys):
    _refused(_load("convergence").main, argv, capsys, message)


def test_every_script_has_help(capsys):
    for path in sorted(SCRIPTS.glob("*.py")):
        module = _load(path.stem)
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0, path.name
        assert "usage" in capsys.readouterr().out, path.name
