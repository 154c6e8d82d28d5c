"""braid.checkpoint: save, resume, export and load runs.

manager.py   Checkpointer(run_dir, cfg, ctx).save(...) / .resume(...): the trainer's interface
storage.py   tensors through torch.distributed.checkpoint, read without unpickling objects
state.py     non-tensor state as lossless JSON; atomic, fsynced writes
rng.py       every RNG stream of a process (python, numpy, torch, CUDA)
meta.py      meta.json: step, TrainState, config + fingerprint, file sizes (written last)
paths.py     checkpoint directories, completeness, resume targets, the keep policy
compat.py    which config changes a resume accepts
load.py      load_for_inference(path, device): a one-process model from a run or an export
export.py    export(run, out): model.safetensors + config.json + tokenizer.json
"""
