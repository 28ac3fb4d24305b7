"""The package without its compiled kernels: it imports, warns once, and runs the reference ops."""
import subprocess
import sys
import textwrap


def run_python(code, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)


def test_import_without_compiled_module_warns_once_and_uses_reference():
    result = run_python(
        """
        import sys, warnings
        sys.modules["deepfm_fast._C"] = None  # as if the extension were never built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import deepfm_fast
            import torch
            emb = torch.randn(3, 4, 5, requires_grad=True)
            out = deepfm_fast.FMInteraction()(emb)
            out.sum().backward()
        ours = [w for w in caught if "deepfm_fast" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert "pip install --no-build-isolation" in str(ours[0].message)
        assert deepfm_fast.backend() == "reference"
        assert torch.allclose(out.squeeze(1), deepfm_fast.reference.fm_interaction(emb))
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_environment_variable_forces_reference_backend():
    result = run_python(
        "import deepfm_fast; print(deepfm_fast.backend())", env_extra={"DEEPFM_FAST_BACKEND": "reference"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"
    assert "RuntimeWarning" not in result.stderr
