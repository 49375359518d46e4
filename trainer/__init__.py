"""The training system around the ControlNet model: the LightningModule (`trainer.module`), resumable data
(`trainer.resumable_data`), the latent cache, checkpoint callbacks and IO (`trainer.checkpointing`), the
image log (`trainer.logger`) and the control-fidelity callback."""
