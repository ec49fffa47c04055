"""Files other tools load: one entry point for `diffquant export --format gguf|diffusers`."""

from __future__ import annotations

from pathlib import Path

from diffquant.errors import ConfigError

FILE_FORMATS = ("gguf", "diffusers")


def export_file(model_path: str, out: Path, file_format: str, gguf_type: str | None, layout: str) -> list[str]:
    """Load a model directory (float or quantized), write it in `file_format`, return the summary lines."""
    from diffquant.api import load

    if file_format not in FILE_FORMATS:
        raise ConfigError(f"Unknown export format '{file_format}'. Choose kernels, {', '.join(FILE_FORMATS)}.")
    model = load(model_path)
    if file_format == "gguf":
        from diffquant.runtime.gguf import export_gguf

        path = out if out.suffix == ".gguf" else out.with_suffix(".gguf")
        path.parent.mkdir(parents=True, exist_ok=True)
        report = export_gguf(model, path, float_type=gguf_type, layout=layout).to_json()
        types = ", ".join(f"{count} {name}" for name, count in sorted(report["types"].items()))
        return [
            f"wrote {path} ({report['file_bytes'] / 1e6:.2f} MB, layout {report['layout']}, "
            f"architecture {report['architecture']}): {types}",
            f"  {report['ours']} weights from the method's own codes, {report['rounded']} rounded to nearest here, "
            f"{len(report['dequantized'])} written in float",
        ]
    from diffquant.runtime.diffusers_format import export_diffusers

    report = export_diffusers(model, out)
    return [f"wrote {out} ({report['backend']}): {report['summary']}"]
