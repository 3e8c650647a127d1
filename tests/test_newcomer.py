"""A newcomer's first hour: the README's first screen, what it promises against what the product does, and the
commands as a user runs them (a subprocess, its exit code and first lines), offline, with small inputs."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import gczoo
from gczoo.cards import model_card
from gczoo.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {p: p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))}
#: The README's first screen: what a new user reads before scrolling.
FIRST_SCREEN = "\n".join(README.splitlines()[:40])
OFFLINE = {"HF_HUB_OFFLINE": "1", "GCZOO_OFFLINE": "1", "GCZOO_DOWNLOAD_TIMEOUT": "1"}


def _run(*args, env=None, cwd=ROOT, timeout=300):
    run_env = dict(os.environ, OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=run_env,
                          timeout=timeout)


def _script(code: str, env=None):
    return _run("-c", textwrap.dedent(code), env=env)


# --------------------------------------------------------------------------- the README against the product

def test_first_screen_installs_for_the_machine_runs_the_demo_loads_a_model_and_points_on():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and block[0].endswith("gczoo demo") and "pytest" in block[1]
    assert all("download.pytorch.org" not in line for line in block)  # only PyPI needed for the two commands
    assert block[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert README.index("--index-url https://download.pytorch.org/whl/cpu") < len(FIRST_SCREEN)
    assert "CPU-only" in FIRST_SCREEN and "5.5 GB" in FIRST_SCREEN and "CUDA" in FIRST_SCREEN
    for call in ("gczoo.create_model(", "timm.create_model(", "torch.hub.load(", "import gczoo"):
        assert call in FIRST_SCREEN, call
    owner = re.search(r'torch\.hub\.load\("([^"]+)"', FIRST_SCREEN).group(1)
    assert re.search(rf"`{re.escape(owner)}`: the GitHub owner and repository", FIRST_SCREEN)
    assert "Where to go next" in FIRST_SCREEN
    assert "| `resnet50_gc_r16` |" not in FIRST_SCREEN  # the model table comes lower down
    assert "## Weights you can trust" in README


def test_every_link_of_the_readme_and_docs_resolves():
    headings = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", README, re.M)}
    for path, text in [(ROOT / "README.md", README), *DOCS.items()]:
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith("http"):
                continue
            file, _, anchor = target.partition("#")
            if file:
                assert (path.parent / file).exists(), f"{path.name}: link to missing {target}"
            elif anchor:
                assert anchor in headings, f"{path.name}: no heading for #{anchor}"


def test_command_line_summary_names_every_subcommand():
    out = _run("-m", "gczoo.cli", "--help")
    commands = re.search(r"\{([a-z,]+)\}", out.stdout).group(1).split(",")
    summary = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    missing = [c for c in commands if f"`gczoo {c}" not in summary]
    assert not missing, f"the README's command-line summary leaves out: {missing}"


def test_quoted_parity_tolerance_is_the_one_the_tests_check_and_the_cards_say():
    tested = re.findall(r"<= ([0-9.e-]+) \* golden\[\"max_abs_logit\"\]", (ROOT / "tests" / "test_segmentation.py").read_text())
    assert len(set(tested)) == 1
    quoted = re.findall(r"within ([0-9.e-]+) of the largest logit", README + "".join(DOCS.values()))
    cards = re.findall(r"within ([0-9.e-]+) of the largest logit", model_card("gcnet_resnet101_d8", full=True))
    assert quoted and cards and set(quoted) == set(cards) == set(tested)


def _help_texts():
    texts = [_run("-m", "gczoo.cli", "--help").stdout]
    texts += [_run("-m", "gczoo.cli", command, "--help").stdout
              for command in ("demo", "list", "info", "table", "download", "pin", "publish", "analyze")]
    texts += [_run(ROOT / "eval" / f"{script}.py", "--help").stdout for script in ("imagenet", "coco", "segmentation")]
    return texts


def test_readme_docs_results_and_help_speak_of_the_product():
    """No numbered work periods, internal issue numbers, remarks on lent machines, or paths only a work
    checkout has; the documents name what was measured, when, with what."""
    forbidden = re.compile(r"\bsessions?\b|\bissue \d+|\bissue's\b|\blent\b|previous session|shared/|\bhelpers?\b",
                           re.I)
    texts = {"README.md": README, "bench/RESULTS.md": (ROOT / "bench" / "RESULTS.md").read_text(),
             **{f"docs/{p.name}": t for p, t in DOCS.items()}, **{f"--help {i}": t for i, t in enumerate(_help_texts())}}
    found = {name: sorted(set(m.group(0) for m in forbidden.finditer(text))) for name, text in texts.items()}
    assert not {k: v for k, v in found.items() if v}
    demo_help = " ".join(_run("-m", "gczoo.cli", "demo", "--help").stdout.split())
    assert "--out PNG detection and segmentation: where to save the drawing" in demo_help
    qi = DOCS[ROOT / "docs" / "query_independence.md"]
    assert "`report/query_independence.json` (the same, plus each block's numbers per image)" in qi


# --------------------------------------------------------------------------- commands: inputs first, fast help

def test_eval_help_imports_no_torch_and_needs_no_extra(tmp_path):
    # a venv without pycocotools: importing it fails, as it does there
    (tmp_path / "pycocotools").mkdir()
    (tmp_path / "pycocotools" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'pycocotools'\", name='pycocotools')\n")
    out = _script(f"""
        import runpy, sys
        for script in ("imagenet", "coco", "segmentation"):
            sys.argv = [f"eval/{{script}}.py", "--help"]
            try:
                runpy.run_path(f"eval/{{script}}.py", run_name="__main__")
            except SystemExit as e:
                print(script, "exit", e.code, "torch imported:", "torch" in sys.modules, file=sys.stderr)
    """, env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), str(ROOT / "eval"),
                                                            os.environ.get("PYTHONPATH")]))})
    assert out.stderr.splitlines() == [f"{s} exit 0 torch imported: False" for s in ("imagenet", "coco", "segmentation")]
    assert out.stdout.count("usage: ") == 3


def test_bad_inputs_fail_before_any_download_or_torch(tmp_path):
    picture = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(picture)
    out = _script(f"""
        import sys
        from gczoo.cli import main
        print("exit", main(["demo", "--image", "missing.jpg"]), flush=True)
        print("exit", main(["analyze", "resnet50_nl_c4", "missing.jpg", "--out", {str(tmp_path)!r}]), flush=True)
        sys.modules["matplotlib"] = None  # not installed
        print("exit", main(["analyze", "resnet50_nl_c4", {str(picture)!r}, "--out", {str(tmp_path)!r}]), flush=True)
        print("exit", main(["table", "--check", "missing.md"]), flush=True)
        print("exit", main(["pin", "resnet50_gc_r61.tv_in1k"]), flush=True)
        print("torch imported:", "torch" in sys.modules)
    """, env=OFFLINE)
    assert out.stdout.splitlines() == ["exit 2"] * 5 + ["torch imported: False"]
    errors = out.stderr.splitlines()
    assert errors[:4] == [
        "gczoo demo: --image missing.jpg: no such file",
        "gczoo analyze: no image file at missing.jpg",
        "gczoo analyze: the attention-map figure needs matplotlib: pip install 'gczoo[analysis]' (or -e "
        "'.[analysis]' in the clone)",
        "gczoo table: missing.md: no such file (--check and --write take the README holding the table)"]
    assert errors[4].startswith("gczoo pin: Unknown model 'resnet50_gc_r61'. Did you mean: resnet50_gc_r16, ")
    assert len(errors) == 5


def test_version_and_one_screen_cards():
    version = _run("-m", "gczoo.cli", "--version")
    assert version.returncode == 0 and version.stdout == f"gczoo {gczoo.__version__}\n"
    name, tag = "gcnet_resnet101_d8", "mmseg_ade20k_512x512_80k"
    card, tagged = model_card(name, full=False), model_card(f"{name}.{tag}", full=False)
    for text in (card, tagged, model_card("resnet50_gc_r16", full=False), model_card("resnet50_nl_c4", full=False)):
        assert len(text.splitlines()) <= 30 and "gczoo.create_model(" in text and "--full" in text
    assert tagged != card and tagged.startswith(f"{name}.{tag}\n") and "ade20k-val mIoU 42.82" in tagged
    assert "cityscapes" not in tagged.split("published results of these weights:", 1)[1].split("training:")[0]
    full = model_card(name, full=True)
    assert len(full) > 3 * len(card) and "sha256 prefix" in full and "sha256 prefix" not in card
    assert model_card(f"{name}.{tag}", full=True).count(f"weights {name}.") == 1


def test_module_gczoo_from_the_folder_holding_the_clone(tmp_path):
    """Run from the folder that holds a clone named gczoo, `import gczoo` takes the clone as an empty namespace
    package (an editable install resolves the package after the current directory): the README names the error
    and the fix, which puts the clone itself on sys.path."""
    (tmp_path / "gczoo").symlink_to(ROOT, target_is_directory=True)
    code = "import gczoo; print(getattr(gczoo, '__file__', None) is None, hasattr(gczoo, 'create_model'))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.stdout == "True False\n"  # the namespace package: no create_model
    fixed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           env=dict(env, PYTHONPATH=str(ROOT)))
    assert fixed.stdout == "False True\n"
    trouble = README.split("## Troubleshooting", 1)[1]
    assert "`AttributeError: module 'gczoo' has no attribute 'create_model'`" in trouble
    assert "editable_mode=compat" in trouble


# --------------------------------------------------------------------------- weights: one rule, every layout

def test_offline_advice_for_prefix_only_tags_names_the_opt_in_and_a_wrong_prefix(tmp_path):
    from gczoo.loading import carry_advice
    from gczoo.registry import weights_entry
    from gczoo.weights import WeightsError, verify_file

    mmseg = "gcnet_resnet50_d8.mmseg_ade20k_512x512_80k"
    assert "GCZOO_ALLOW_PREFIX_ONLY=1" in carry_advice(mmseg, "gczoo demo --model X --weights-file FILE")
    assert "GCZOO_ALLOW_PREFIX_ONLY" not in carry_advice("resnet50_gc_r16.tv_in1k", "gczoo demo --weights-file FILE")
    carried = tmp_path / "gcnet.pth"
    carried.write_bytes(b"not the file")
    tag, entry = weights_entry(mmseg)
    (prefix,) = {s["sha256_prefix"] for s in entry["sources"] if s.get("sha256_prefix")}
    with pytest.raises(WeightsError) as err:
        verify_file("gcnet_resnet50_d8", tag, entry, carried)
    message = str(err.value)
    assert f"does not start with {prefix}" in message and "it is not that file" in message
    assert "GCZOO_ALLOW_PREFIX_ONLY=1" in message and "Carry a pinned file" not in message


#: One architecture of each family of the manifest (gc_resnet, timm, maskrcnn -- cascade rows included, same
#: loader and converter --, segmentation, slowonly), made small where the builder allows (the loader passes the
#: same arguments).
FAMILIES = {"resnet50_gc_r16": dict(layers=[1, 1, 1, 1]), "gcresnext26ts": {},
            "maskrcnn_resnet50_fpn_gc_r16": dict(layers=[1, 1, 1, 1]),
            "gcnet_resnet50_d8": dict(layers=[1, 1, 1, 1]), "slowonly_resnet50": dict(layers=[1, 1, 1, 1])}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_zoo_model_state_dict_loads_as_it_is_in_every_family(name, tmp_path, capfd):
    """`model.state_dict()` saved from a zoo model (a .pth) loads through the loader of every command's
    --checkpoint (the eval scripts' load_model; demo and analyze share its model_from_file), with or without
    weights tags; and, for the family whose converter mangled such a file, through `pretrained_cfg_overlay`."""
    from eval.common import load_model

    kwargs = FAMILIES[name]
    torch.manual_seed(1)
    state = gczoo.create_model(name, **kwargs).state_dict()
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    loaded = load_model(name, torch.device("cpu"), checkpoint=path, **kwargs)
    assert f"{name}: weights from {path} (the zoo's layout)" in capfd.readouterr().err
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    if name == "maskrcnn_resnet50_fpn_gc_r16":  # the same test inside the converters' filter, for the Python API
        api = gczoo.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        assert all(torch.equal(v, state[k]) for k, v in api.state_dict().items())


def test_demo_and_analyze_one_rule_seeded_random_weights_drawn_and_explained(tmp_path):
    """Offline: analyze falls back to random weights as demo does, and says how to get real ones; random weights
    are seeded (two runs, one output); the demo prints no model list; the pictures carry the caption, the
    segmentation a legend; an untrained detector's empty picture is explained, without torchvision's warning; a
    zoo-layout --checkpoint goes through demo."""
    small = tmp_path / "small.png"
    Image.new("RGB", (48, 32), (120, 60, 200)).save(small)
    torch.manual_seed(2)
    mine = tmp_path / "mine.pth"
    torch.save(gczoo.create_model("gcresnext26ts").state_dict(), mine)
    seg, det = tmp_path / "seg.png", tmp_path / "det.png"
    out = _script(f"""
        from gczoo.cli import main
        print("exit", main(["analyze", "resnet50_gc_r16", {str(small)!r}, "--out", {str(tmp_path / "qi")!r}]))
        print("exit", main(["demo", "--model", "gcresnext26ts", "--image", {str(small)!r}]))
        print("exit", main(["demo", "--model", "gcresnext26ts", "--image", {str(small)!r}]))
        print("exit", main(["demo", "--model", "gcnet_resnet50_d8.mmseg_ade20k_512x512_80k", "--image", {str(small)!r},
                            "--out", {str(seg)!r}]))
        print("exit", main(["demo", "--model", "maskrcnn_resnet50_fpn", "--min-size", "64", "--out", {str(det)!r}]))
        print("exit", main(["demo", "--model", "gcresnext26ts", "--checkpoint", {str(mine)!r}, "--image",
                            {str(small)!r}]))
    """, env=OFFLINE)
    assert out.returncode == 0, out.stderr
    assert re.findall(r"^exit (\d+)$", out.stdout, re.M) == ["0"] * 6, out.stdout + out.stderr
    runs = out.stdout.split("exit 0\n")
    analyze, nl1, nl2, segmentation, detection, checkpoint = runs[:6]
    assert "== resnet50_gc_r16: random weights (seed 0), as its weights resnet50_gc_r16.tv_in1k could not be fetched" \
        in analyze and "--checkpoint FILE" in analyze and "--weights-file FILE" in analyze
    assert "random weights (seed 0)" in json.loads((tmp_path / "qi" / "query_independence.json").read_text())["weights"]
    top = [line for line in nl1.splitlines() if line.startswith("  0.")]
    assert len(top) == 5 and top == [line for line in nl2.splitlines() if line.startswith("  0.")]
    assert "resnet50_snl_c4" not in nl1 and len(nl1.splitlines()) < 16  # no model list
    assert "GCZOO_ALLOW_PREFIX_ONLY=1" in segmentation
    legend = [line for line in segmentation.splitlines() if re.match(r"  \d\.\d{3}  ", line)]
    assert legend
    with Image.open(seg) as image:
        assert image.size[0] >= 48 and image.size[1] >= 32 + 14 * (len(legend) + 1)
        caption = image.convert("RGB").crop((0, 32, image.size[0], 32 + 16))  # the first line under the picture
        assert any(r > 150 and g < 120 and b < 120 for _, (r, g, b) in caption.getcolors(1 << 16))  # red: "random"
    assert "untrained heads score every class near 1/81" in detection
    assert "boxes doesn't contain any box" not in out.stderr
    with Image.open(det) as image:
        assert image.size[0] == 400 and image.size[1] > 300
    assert f"weights from {mine} (the zoo's layout)" in checkpoint and "random weights" not in checkpoint


def test_dataset_mismatch_reads_as_english():
    from eval.segmentation import BadInput, _check_model

    with pytest.raises(BadInput, match=r"^gcnet_resnet50_d8.mmseg_ade20k_512x512_80k is a model of ade20k, but --data "
                                        r"holds cityscapes"):
        _check_model("gcnet_resnet50_d8.mmseg_ade20k_512x512_80k", "cityscapes")


def test_eval_errors_start_a_line_of_their_own(capfd):
    """An error raised inside a progress bar's loop is printed on a line of its own, not after the bar."""
    from eval.common import Distributed, print_error, progress

    bar = progress(range(3), total=3, desc="images", dist=Distributed(0, 1, torch.device("cpu")))
    next(bar)
    print_error("images/1.png: cannot read it")
    assert "error: images/1.png: cannot read it" in capfd.readouterr().err.splitlines()
