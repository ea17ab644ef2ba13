"""transformers stays optional: without it fusedformer imports, converts torch.nn models, and the
Hugging Face entry points say what is missing (run in a subprocess where transformers cannot be
imported, whether or not it is installed here)."""
import subprocess
import sys
import textwrap


def test_fusedformer_works_without_transformers_and_register_hf_says_what_is_missing():
    code = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None          # any import of transformers now fails
        import torch
        import fusedformer as ff
        layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, activation="gelu")
        report = ff.convert(layer)
        assert report.converted == [""], report
        ff.revert(layer)
        from fusedformer.integrations import register_hf
        try:
            register_hf()
        except ImportError as exc:
            assert "fusedformer[hf]" in str(exc), exc
        else:
            raise SystemExit("register_hf() did not refuse without transformers")
        try:
            ff.convert(layer, attn_implementation="fusedformer")
        except ValueError as exc:
            assert "Hugging Face models" in str(exc), exc
        else:
            raise SystemExit("convert(attn_implementation=) accepted a model without transformers")
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
