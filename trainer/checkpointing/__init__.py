"""Checkpointing: complete-or-invisible folders (checkpoint), asynchronous writes
(async_checkpoint), layout conversion on resume (reshard), DeepSpeed's internals
(deepspeed_internals), and the manager that saves and loads a run's named stateful pieces."""
