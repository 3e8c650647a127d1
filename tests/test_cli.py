"""The command line as a newcomer meets it: each command run as a user runs it (a subprocess, its exit code
and first lines), offline, with random weights where the zoo has none."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from PIL import Image

from gczoo.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None, timeout=300):
    run_env = dict(os.environ, OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=run_env,
                          timeout=timeout)


def test_names_cards_unknown_tags_and_offline_download_as_the_command_line_says():
    """list/info/table/--help answer without importing torch or timm; `import gczoo` still registers the zoo
    with timm; every command refuses an unknown tag alike; `gczoo download` offline gives command-line advice."""
    script = textwrap.dedent("""
        import os, sys
        from gczoo.cli import main
        for argv in (["list", "*_c4"], ["info", "resnet50_nl_c4"], ["info", "resnet50_gc_r16.foo"],
                     ["download", "resnet50_gc_r16.foo"], ["demo", "--model", "resnet50_gc_r16.foo"], ["table"]):
            print("exit", main(argv), flush=True)
        print("torch imported:", "torch" in sys.modules, "timm imported:", "timm" in sys.modules, flush=True)
        import gczoo, timm  # import gczoo still registers the zoo with timm, once timm is loaded
        print("registered:", timm.is_model("resnet50_gc_r16"), flush=True)
        os.environ["HF_HUB_OFFLINE"] = "1"
        print("exit", main(["download", "resnet101_gc_r16.tv2_in1k"]))
    """)
    out = _run("-c", script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:4] == ["resnet50_gc_r16_c4", "resnet50_nl_c4", "resnet50_snl_c4", "exit 0"]
    assert "resnet50_nl_c4" == lines[4]
    assert "parameters: 27.66M; published 27.66M" in lines
    assert [l for l in lines if l.startswith("exit")] == ["exit 0"] * 2 + ["exit 2"] * 3 + ["exit 0", "exit 2"]
    assert "| `resnet50_nl_c4` | - | 27.66 | 77.21 / 93.64 (paper, no weights) | - | - | - |" in lines
    assert "torch imported: False timm imported: False" in lines and "registered: True" in lines
    unknown, offline = out.stderr.split("gczoo download: cannot obtain weights resnet101_gc_r16.tv2_in1k")
    errors = unknown.splitlines()
    assert [e.split(":")[0] for e in errors] == ["gczoo info", "gczoo download", "gczoo demo"]
    tags = ", ".join(load_manifest()["models"]["resnet50_gc_r16"]["weights"])
    assert all(f"Unknown weights tag 'foo' for resnet50_gc_r16; its tags are: {tags}." in e for e in errors)
    assert "unset HF_HUB_OFFLINE" in offline and "gczoo download" not in offline and "pretrained_cfg_overlay" not in offline
    help_ = _run("-m", "gczoo.cli", "--help")
    assert help_.returncode == 0 and help_.stdout.startswith("usage: gczoo")


def test_demo_runs_every_family_with_random_weights_and_says_so(tmp_path):
    """A classifier without weights in the zoo (top-5, exit 0), a detection model whose weights cannot be
    fetched offline (detections drawn on the picture, saved as PNG, with the command line's advice), a
    video model (a static clip, top-5 class indices) and a segmentation model whose weights cannot be fetched
    offline (a coloured class map saved as PNG)."""
    png, seg_png, small = tmp_path / "detections.png", tmp_path / "segmentation.png", tmp_path / "small.png"
    Image.new("RGB", (48, 32), (120, 60, 200)).save(small)
    script = textwrap.dedent(f"""
        from gczoo.cli import main
        print("exit", main(["demo", "--model", "resnet50_nl_c4"]), flush=True)
        print("exit", main(["demo", "--model", "maskrcnn_resnet50_fpn", "--out", {str(png)!r}, "--min-size", "160"]),
              flush=True)
        print("exit", main(["demo", "--model", "slowonly_resnet50_gc5"]), flush=True)
        print("exit", main(["demo", "--model", "gcnet_resnet50_d8.mmseg_ade20k_512x512_80k", "--image", {str(small)!r},
                            "--out", {str(seg_png)!r}]))
    """)
    out = _run("-c", script, env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    nl, det, video, seg = out.stdout.split("exit 0\n")[:4]
    assert out.stdout.count("exit 0\n") == 4
    assert "== resnet50_nl_c4: random weights (seed 0), as the zoo has no weights for it" in nl
    top = nl.split("top-5 ImageNet classes (random weights: these classes mean nothing):\n", 1)[1].splitlines()[:5]
    probs = [float(line.split()[0]) for line in top]
    assert len(top) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.001

    assert "cannot obtain weights maskrcnn_resnet50_fpn.mmdet_syncbn_1x_coco" in det
    assert "run `gczoo demo --model maskrcnn_resnet50_fpn.mmdet_syncbn_1x_coco --weights-file FILE`" in det
    assert "pretrained_cfg_overlay" not in det and "(random weights: these detections mean nothing)" in det
    assert f"wrote {png}" in det
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] == 400 and image.size[1] > 300  # a caption band under it

    assert "== slowonly_resnet50_gc5: random weights (seed 0), as the zoo has no weights for it" in video
    assert "static clip (1, 3, 8, 224, 224) (the picture repeated over 8 frames) -> logits (1, 400)" in video
    top = video.split("top-5 Kinetics-400 class indices (random weights: these classes mean nothing):\n", 1)[1]
    assert [line.split()[1] for line in top.splitlines()[:5]] == ["class"] * 5

    assert "cannot obtain weights gcnet_resnet50_d8.mmseg_ade20k_512x512_80k" in seg
    assert "-> 150-class map (32, 48) (ade20k)" in seg and "(random weights: these classes mean nothing)" in seg
    with Image.open(seg_png) as image:
        assert image.format == "PNG" and image.size[0] >= 48 and image.size[1] > 32  # the legend under it


def test_eval_script_without_its_extra_names_the_install_line_and_exits_2(tmp_path):
    # a venv without pycocotools, as the README's first command makes: an import of it fails as it would there
    (tmp_path / "pycocotools").mkdir()
    (tmp_path / "pycocotools" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'pycocotools'\", name='pycocotools')\n")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    assert _run("eval/coco.py", "--help", env={"PYTHONPATH": path}).stdout.startswith("usage: coco.py")
    out = _run("eval/coco.py", "--model", "maskrcnn_resnet50_fpn", "--data", tmp_path, env={"PYTHONPATH": path})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "error: coco.py needs the 'coco' extra (pycocotools is not installed): " \
                         "pip install -e '.[coco]' in the clone\n"


def test_stored_parameter_counts_equal_the_built_models():
    """Cards and the README table show the manifest's `params` without building anything; each one is the count
    of the model `create_model(NAME)` builds (rebuilt here on the meta device), so the stored data cannot drift."""
    from gczoo.cards import _meta_model, count_params

    models = load_manifest()["models"]
    counted = {arch: count_params(_meta_model(arch)) for arch in models}
    wrong = [f"{arch}: stored {models[arch]['params']}, built {n}" for arch, n in counted.items()
             if n != models[arch]["params"]]
    assert not wrong, "set models.NAME.params in weights_manifest.json to the built count:\n" + "\n".join(wrong)
