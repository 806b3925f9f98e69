"""Screenshots of the MLflow pages a reviewer uses, taken from real demo runs, for docs/tracking.md.

Runs the documented commands into one MLflow store (kvasir_seg training and evaluation, medvtab_cls training, a
3-fold cross-validation on the kvasir demo set), starts `mlflow ui --workers 1` on 127.0.0.1, opens each page in
headless Chromium through Playwright and writes small PNGs (palette, under ~200 KB) to docs/images/.

Needs Chromium (Debian: `apt-get install chromium`) and Playwright (`pip install -e '.[docs]'`; it drives the system
Chromium, nothing is downloaded). Not part of the test suite. From the repository root:

    python scripts/mlflow_screenshots.py [--work outputs/mlflow_screenshots] [--out docs/images] [--port 5055]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
ML_VIEW = "workflowType=machine_learning"  # MLflow 3's "Model training" view (the UI opens in GenAI otherwise)
#: runs-table columns switched on (metrics) or off (Source: the git commit shows on the run page)
TABLE_COLUMNS = ["Source", "best_val_mean_iou", "best_epoch", "val_mean_dice", "val_mean_dice_mean",
                 "val_mean_dice_std"]


def run(cmd: list[str], env: dict, log: Path) -> None:
    """Run one documented command from the repository root; stop with its log's tail when it fails."""
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def make_runs(work: Path, env: dict) -> None:
    """The demo runs: each step is skipped when its output exists (re-running the script reuses them)."""
    py, kv, cls = sys.executable, "bundles/kvasir_seg", "bundles/medvtab_cls"
    steps = [
        (work / "kvasir_seg" / "results.json",
         [py, "-m", "monai.bundle", "run", "training", "--config_file", f"{kv}/train.json",
          "--output_dir", str(work / "kvasir_seg")]),
        (work / "kvasir_seg" / "eval_metrics.json",
         [py, "-m", "monai.bundle", "run", "evaluating", "--config_file", f"['{kv}/train.json','{kv}/evaluate.json']",
          "--output_dir", str(work / "kvasir_seg")]),
        (work / "medvtab_cls" / "results.json",
         [py, "-m", "monai.bundle", "run", "training", "--config_file", f"{cls}/train.json",
          "--output_dir", str(work / "medvtab_cls")]),
        (work / "cv" / "cv_results.json",
         [py, "-m", "medpmoe.crossval", "--config_file", f"{kv}/train.json",
          "--datalist", str(work / "kvasir_seg" / "synthetic_data" / "polyp_48x64px_seed0" / "datalist.json"),
          "--output_dir", str(work / "cv"), "--k", "3", "--num_epochs", "4"]),
    ]
    for i, (done, cmd) in enumerate(steps):
        if not done.is_file():
            run(cmd, env, work / f"step{i}.log")


def serve(uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui --workers 1` on 127.0.0.1:port; returns once /health answers (about 17 s on 2 cores)."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([mlflow, "ui", "--backend-store-uri", uri, "--workers", "1", "-h", "127.0.0.1",
                             "-p", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    for _ in range(180):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"mlflow ui exited:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    proc.terminate()
    sys.exit("mlflow ui did not answer within 180 s")


def ids(uri: str) -> dict:
    """The runs and the model the screenshots show."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("kvasir_seg")
    runs = client.search_runs([exp.experiment_id])
    train = next(r for r in runs if "medpmoe.cv" not in r.data.tags and "mlflow.parentRunId" not in r.data.tags)
    evaluation = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == train.info.run_id)
    parent = next(r for r in runs if r.data.tags.get("medpmoe.cv") == "parent")
    return {"exp": exp.experiment_id, "train": train.info.run_id, "eval": evaluation.info.run_id,
            "cv": parent.info.run_id, "model": train.outputs.model_outputs[0].model_id}


def small_png(png: bytes, path: Path, limit: int = 200_000) -> None:
    """Write a screenshot as a palette PNG (UI screenshots have few colours), halving its size if still too big."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        buf = io.BytesIO()
        img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= limit or img.width < 800:
            break
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.LANCZOS)
    path.write_bytes(buf.getvalue())
    print(f"{path} {buf.tell() // 1024} KB", flush=True)


def shoot(port: int, chromium: str, out: Path, i: dict) -> None:
    """Open each page, close the assistant panel, do the page's clicks, save the screenshot."""
    from playwright.sync_api import sync_playwright

    base = f"http://127.0.0.1:{port}/#/experiments/{i['exp']}"

    def runs_table(page):
        for expander in page.locator(".ag-row button:not([data-testid])").all():  # show nested runs
            expander.click()
            page.wait_for_timeout(300)
        page.get_by_role("button", name="Columns", exact=True).click()
        page.wait_for_timeout(800)
        for name in TABLE_COLUMNS:
            page.get_by_text(name, exact=True).last.click()
            page.wait_for_timeout(200)
        page.keyboard.press("Escape")

    def model_file(page):
        page.get_by_text("MLmodel", exact=True).first.click()

    pages = [
        ("mlflow_runs.png", f"{base}/runs?{ML_VIEW}", runs_table),
        ("mlflow_run_overview.png", f"{base}/runs/{i['train']}?{ML_VIEW}", None),
        ("mlflow_run_metrics.png", f"{base}/runs/{i['train']}/model-metrics?{ML_VIEW}", None),
        ("mlflow_run_artifacts.png", f"{base}/runs/{i['train']}/artifacts/plots/segmentation_overlays.png?{ML_VIEW}",
         None),
        ("mlflow_evaluation_run.png", f"{base}/runs/{i['eval']}?{ML_VIEW}", None),
        ("mlflow_logged_model.png", f"{base}/models/{i['model']}/artifacts?{ML_VIEW}", model_file),
        ("mlflow_cv_parent.png", f"{base}/runs/{i['cv']}?{ML_VIEW}", None),
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        normal = browser.new_page(viewport={"width": 1440, "height": 860})
        wide = browser.new_page(viewport={"width": 1880, "height": 560})  # the runs table: room for metric columns
        tall = browser.new_page(viewport={"width": 1440, "height": 1560})  # MLmodel down to the signature
        for name, url, action in pages:
            page = {runs_table: wide, model_file: tall}.get(action, normal)
            page.goto(url)
            page.wait_for_load_state("load")
            page.wait_for_timeout(4000)  # the single-page app fetches its data after "load" (and keeps polling)
            close = page.get_by_role("button", name="Close")
            if close.count():
                close.first.click()
                page.wait_for_timeout(500)
            if action:
                action(page)
                page.wait_for_timeout(1500)
            small_png(page.screenshot(), out / name)
        browser.close()


def main(argv=None) -> None:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "outputs" / "mlflow_screenshots"))
    p.add_argument("--out", default=str(REPO / "docs" / "images"))
    p.add_argument("--port", type=int, default=5055)
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args(argv)
    work, out = Path(args.work).resolve(), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    make_runs(work, env)
    server = serve(uri, args.port, work / "mlflow_ui.log")
    try:
        shoot(args.port, args.chromium, out, ids(uri))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
