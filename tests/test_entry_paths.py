"""Every way a user reaches a model, each from a clean start: a fresh process that imports nothing first.

The subprocesses get no PYTHONPATH but the folder that holds the package under test (none at all
where torch.hub puts the repository on ``sys.path`` itself), and run outside the source tree.
Models are built with random weights (``pretrained=False``) on tiny inputs; no network.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER, DETECTOR, SEGMENTER = "resnet50_gc_r16", "maskrcnn_resnet50_fpn_gc_r16", "gcnet_resnet50_d8"
#: a ResNet with one block per stage: every code path of the family, a fraction of the size
SMALL = dict(layers=[1, 1, 1, 1])


def run(args, cwd, pythonpath=(REPO,), timeout=300, **env):
    """Run ``args`` in a fresh process; its stdout, or a failure showing both streams."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        environ["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    # any attempt to reach the network fails at once instead of waiting for a timeout
    environ.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", HF_HUB_OFFLINE="1", **env)
    proc = subprocess.run(args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def python(code, cwd, *args, **kwargs):
    return run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd, **kwargs)


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


HUB = f"""
    import sys, torch
    repo, source, hub_dir = sys.argv[1:]
    torch.hub.set_dir(hub_dir)
    hub = dict(trust_repo=True, skip_validation=True)
    names = doc = None
    if source == "github":  # torch.hub's list and help know only this form
        names, doc = torch.hub.list(repo, **hub), torch.hub.help(repo, "{CLASSIFIER}", **hub)
    hub["source"] = source
    classifier = torch.hub.load(repo, "{CLASSIFIER}", num_classes=5, **{SMALL}, **hub)
    detector = torch.hub.load(repo, "{DETECTOR}", **{SMALL}, **hub)
    segmenter = torch.hub.load(repo, "{SEGMENTER}", **{SMALL}, **hub)
    import gczoo, timm
    print(__import__("json").dumps(dict(
        names=names, doc=doc,
        logits=list(classifier.eval()(torch.zeros(1, 3, 32, 32)).shape),
        types=[type(m).__module__ + "." + type(m).__name__ for m in (classifier, detector, segmenter)],
        timm_after_hub=timm.is_model("{CLASSIFIER}"), package=gczoo.__file__)))
"""


def check_hub(out, package_root):
    assert out["logits"] == [1, 5]
    assert out["types"][0] == "gczoo.models.gc_resnet.GCResNet"
    assert out["types"][1].startswith("gczoo.models.detection.") and out["types"][2].startswith("gczoo.models.segmentation.")
    assert out["timm_after_hub"]
    assert Path(out["package"]).resolve().is_relative_to(package_root.resolve())


def test_torch_hub_local(tmp_path):
    """torch.hub.load(<checkout>, NAME, source="local"): torch.hub's dependency check (find_spec) runs between
    `import gczoo` (hubconf) and `import timm` (the first model); classifier, detector and segmentation load."""
    out = last_json(python(HUB, tmp_path, REPO, "local", tmp_path / "hub", pythonpath=()))
    check_hub(out, REPO)


def test_torch_hub_github_cache(tmp_path):
    """torch.hub.load("org/gczoo:main", NAME) with the repository in torch.hub's cache (as its download leaves
    it, <hub_dir>/<owner>_<repo>_<ref>): no network, and the cached copy is the package that runs."""
    cached = tmp_path / "hub" / "org_gczoo_main"
    cached.mkdir(parents=True)
    shutil.copy(REPO / "hubconf.py", cached)
    shutil.copytree(REPO / "gczoo", cached / "gczoo", ignore=shutil.ignore_patterns("__pycache__"))
    out = last_json(python(HUB, tmp_path, "org/gczoo:main", "github", tmp_path / "hub", pythonpath=()))
    check_hub(out, cached)
    assert {CLASSIFIER, DETECTOR, SEGMENTER} <= set(out["names"]) and "gczoo info " + CLASSIFIER in out["doc"]


def test_probes_then_timm_spawned_workers_and_unpickling(tmp_path):
    """`import gczoo`, then the probes libraries run (find_spec, importlib.metadata), then `import timm`:
    timm knows the zoo in the main process and in DataLoader workers started with spawn (which re-run
    the script's imports, probes included, and call timm.create_model). A classifier pickled there
    loads in a new process that imports nothing first, and timm knows the zoo there too."""
    script, pickled = tmp_path / "user_script.py", tmp_path / "models.pkl"
    script.write_text(textwrap.dedent(f"""
        import importlib.metadata, importlib.util, pickle, sys
        import gczoo
        assert importlib.util.find_spec("timm") is not None and importlib.metadata.version("timm")
        importlib.util.find_spec("timm")
        import timm
        import torch
        from torch.utils.data import DataLoader, Dataset, get_worker_info


        class Logits(Dataset):
            def __len__(self):
                return 2

            def __getitem__(self, i):
                model = timm.create_model("{CLASSIFIER}", num_classes=3, **{SMALL})
                return get_worker_info().id, model.eval()(torch.zeros(1, 3, 32, 32)).shape[-1]


        if __name__ == "__main__":
            with open(sys.argv[1], "wb") as f:
                pickle.dump(timm.create_model("{CLASSIFIER}", num_classes=4, **{SMALL}), f)
            loader = DataLoader(Logits(), num_workers=2, batch_size=None, multiprocessing_context="spawn")
            print(__import__("json").dumps(sorted((int(w), int(n)) for w, n in loader)))
    """))
    assert last_json(run([sys.executable, script, pickled], tmp_path)) == [[0, 3], [1, 3]]
    out = last_json(python(f"""
        import pickle, sys
        with open(sys.argv[1], "rb") as f:
            classifier = pickle.load(f)
        import timm, torch
        print(__import__("json").dumps(dict(
            logits=list(classifier.eval()(torch.zeros(1, 3, 32, 32)).shape), timm_knows=timm.is_model("{CLASSIFIER}"))))
    """, tmp_path, pickled))
    assert out == dict(logits=[1, 4], timm_knows=True)


STANDIN = """
    # stands in for timm's train.py / validate.py: argparse, then timm.create_model by name
    import argparse, json, sys
    import torch
    import torch.distributed as dist
    from timm.models import create_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--num-classes", type=int)


    def main():
        args = parser.parse_args()
        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(create_model(args.model, num_classes=args.num_classes,
                                                                       layers=[1, 1, 1, 1]))
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        report = dict(rank=dist.get_rank(), world=dist.get_world_size(), argv=sys.argv, classes=model.module.num_classes)
        with open(f"{sys.argv[0]}.rank{dist.get_rank()}.json", "w") as f:  # a file each: workers share one stdout
            json.dump(report, f)
        dist.destroy_process_group()


    if __name__ == "__main__":
        main()
"""


def test_timm_script_runner_under_torchrun(tmp_path):
    """The documented way for timm's scripts, in torchrun workers (2 processes, gloo, CPU):
    `torchrun -m gczoo.timm_run SCRIPT ARGS` runs SCRIPT as __main__ with its own argv."""
    script = tmp_path / "scripts" / "train.py"
    script.parent.mkdir()
    script.write_text(textwrap.dedent(STANDIN))
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "gczoo.timm_run", script, "--model", CLASSIFIER, "--num-classes", "3"], tmp_path, OMP_NUM_THREADS="1")
    lines = [json.loads(Path(f"{script}.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(d["rank"], d["world"], d["classes"]) for d in lines] == [(0, 2, 3), (1, 2, 3)]
    assert lines[0]["argv"] == [str(script), "--model", CLASSIFIER, "--num-classes", "3"]


def imported_modules(stderr):
    """Top-level names of the modules a process imported, from its ``-X importtime`` report."""
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:")}


def light_run(args, cwd, pythonpath=(REPO,)):
    """stdout of a command that must not import torch or timm (checked through ``-X importtime``)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(PYTHONPROFILEIMPORTTIME="1", PYTHONPATH=os.pathsep.join(map(str, pythonpath)))
    proc = subprocess.run(args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    modules = imported_modules(proc.stderr)
    assert "gczoo" in modules and not modules & {"torch", "timm", "torchvision"}, sorted(modules)
    return proc.stdout


def test_python_m_gczoo_stays_light(tmp_path):
    """`python -m gczoo` answers --help, list, info and table without importing torch or timm; so does
    `python -m gczoo.timm_run` when the script is missing (a clear message, exit 1)."""
    assert "list" in light_run([sys.executable, "-m", "gczoo", "--help"], tmp_path)
    assert CLASSIFIER in light_run([sys.executable, "-m", "gczoo", "list"], tmp_path)
    assert CLASSIFIER in light_run([sys.executable, "-m", "gczoo", "info", CLASSIFIER], tmp_path)
    assert CLASSIFIER in light_run([sys.executable, "-m", "gczoo", "table"], tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gczoo.timm_run", "train.py"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and "no script at 'train.py'" in proc.stderr and "pytorch-image-models" in proc.stderr


def test_installed_wheel_and_console_script(tmp_path):
    """The wheel, installed outside the source tree: its console script (light), its manifest, and
    `import timm` then `import gczoo` in a process that finds gczoo only there."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this environment")
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist",
                                                                 "tests", "eval", "bench", "docs"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp_path / "wheel", source], tmp_path, pythonpath=())
    (wheel,) = (tmp_path / "wheel").glob("gczoo-*.whl")
    assert {"gczoo/weights_manifest.json", "gczoo/manifest.schema.json", "gczoo/timm_run.py",
            "gczoo/__main__.py"} <= set(zipfile.ZipFile(wheel).namelist())
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", site, wheel],
        tmp_path, pythonpath=())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert CLASSIFIER in light_run([site / "bin" / "gczoo", "list"], outside, pythonpath=(site,))
    out = last_json(python(f"""
        import timm, torch
        import gczoo
        model = timm.create_model("{CLASSIFIER}", num_classes=2, **{SMALL})
        print(__import__("json").dumps(dict(package=gczoo.__file__, cards=len(gczoo.list_models()),
                                            logits=list(model.eval()(torch.zeros(1, 3, 32, 32)).shape))))
    """, outside, pythonpath=(site,)))
    assert Path(out["package"]).is_relative_to(site) and out["cards"] > 0 and out["logits"] == [1, 2]
