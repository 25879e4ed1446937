"""Run by tests/test_ddp_sampling.py: two CPU processes (gloo) train a probe on the AUDataModule
with balanced sampling and write, per rank and epoch, the sample indices that rank was given.

    python tests/ddp_sampling_run.py DATA_ROOT CACHE_DIR OUT_DIR USE_DISTRIBUTED_SAMPLER
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.alignment.align import AlignmentSettings  # noqa: E402
from datamodules.au_datamodule import AUDataModule  # noqa: E402
from datamodules.synthau.generate import SynthAUSettings  # noqa: E402


class IndexProbe(L.LightningModule):
    """Learns nothing worth keeping; records which samples each rank sees."""

    def __init__(self, out: Path):
        super().__init__()
        self.out = out
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen += batch["index"].tolist()
        return self.layer(batch["image"].mean((2, 3))).mean()

    def on_train_epoch_end(self):
        path = self.out / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps({"world_size": self.trainer.world_size, "indices": self.seen}))
        self.seen = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    data_root, cache_dir, out, wrap = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1"
    data = AUDataModule(data_root=data_root, synth=SynthAUSettings(num_images=120, seed=3), cache_dir=cache_dir,
                        alignment=AlignmentSettings(crop_size=64), batch_size=8, num_workers=0,
                        balanced_sampling=True, shard_sampler=not wrap, augment=False, seed=17)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, use_distributed_sampler=wrap,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(IndexProbe(out), datamodule=data)
