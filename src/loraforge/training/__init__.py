"""The training stage: `train()` and what keeps a run safe.

* [`trainer`][loraforge.training.trainer]: `train()`, a page of named steps;
* [`output`][loraforge.training.output]: the run folder (ownership, lock, clearing, resume
  checks, the merge folder);
* [`saving`][loraforge.training.saving]: the final save, staged and moved into place;
* [`checkpoints`][loraforge.training.checkpoints]: complete-checkpoint manifests;
* [`guards`][loraforge.training.guards]: the disk-space guard and the skipped-records file;
* [`nonfinite`][loraforge.training.nonfinite]: the non-finite loss and gradient guard.
"""
