"""Run under torchrun: the training run's evaluation (experiments.train.eval_fn) with a model
whose every forward takes DELAY seconds, under the process-group timeout train.dist_timeout_s.

argv: out_dir, mode, timeout_s. mode "sharded": every rank evaluates its share (what the loop
does); rank 0 then also evaluates the whole split alone and saves both results. mode "rank0":
rank 0 evaluates the whole split while the others wait in a broadcast (the loop before sharding).
"""

import json
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from experiments.config import compose_config
from experiments.train import build_accelerator, eval_fn
from ppc_core.data import build_dataset
from ppc_core.evaluate import evaluate
from ppc_core.models import CAMNet, build_backbone

DELAY = 0.5  # seconds per forward: 8 batches take 4 s in one process, 2 s per rank in two


class SlowCAMNet(CAMNet):
    delay = DELAY

    def forward(self, x, project=True, refine=True):  # noqa: ANN001, ANN201
        time.sleep(self.delay)
        return super().forward(x, project, refine)


def _scores(r) -> dict:  # noqa: ANN001
    return {"cam_miou": r.cam_miou, "pseudo_miou": r.pseudo_miou, "num_images": r.num_images,
            "threshold_mious": r.threshold_mious}


if __name__ == "__main__":
    out, mode, timeout = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cfg = compose_config("digits", [
        "train.cpu=true", f"train.dist_timeout_s={timeout}", "data.eval_images=16",
        "eval.batch_size=2", "eval.num_samples=2", "track.trackers=[]",
        f"train.output_dir={out}"])
    acc = build_accelerator(cfg)
    torch.manual_seed(0)
    model = SlowCAMNet(build_backbone("cnn4"), 10).to(acc.device)
    if mode == "sharded":
        last = []
        metrics = eval_fn(cfg, acc, last)(model)
        if acc.is_main_process:
            SlowCAMNet.delay = 0.0
            full = torch.utils.data.DataLoader(
                build_dataset("digits", "val", False, 64, num_images=16), batch_size=2)
            alone = evaluate(model, full, 10, scales=(1.0,), flip=True,
                             bg_threshold=cfg.eval.bg_threshold, progress=False)
            (out / "eval.json").write_text(json.dumps(
                {"sharded": _scores(last[0]), "alone": _scores(alone), "metrics": metrics}))
    else:
        decision = [None]
        if acc.is_main_process:
            full = torch.utils.data.DataLoader(
                build_dataset("digits", "val", False, 64, num_images=16), batch_size=2)
            decision = [evaluate(model, full, 10, progress=False).cam_miou]
        broadcast_object_list(decision)
    acc.end_training()
