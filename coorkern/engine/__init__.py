"""The engine behind the commands: ``coorkern train``, ``evaluate``, ``predict``, ``experiments`` and
``export`` only parse their options and call it.

* :mod:`~coorkern.engine.trainer` -- a training run: setup, epochs, checkpoints, final report;
* :mod:`~coorkern.engine.inference` -- predictions and metrics on a data set, a checkpoint's evaluation;
* :mod:`~coorkern.engine.predictor` -- landmarks for image files of any size, in pixels and mm;
* :mod:`~coorkern.engine.studies` -- the paper's studies as sets of training runs;
* :mod:`~coorkern.engine.study_report` -- a study's report: t-tests, convergence, attention focus;
* :mod:`~coorkern.engine.attention_focus` -- where a trained detector's attention looks (per block);
* :mod:`~coorkern.engine.export` -- export as ONNX (standard operators), TorchScript or a pt2 (AOTInductor) package;
* :mod:`~coorkern.engine.checkpoints`, :mod:`~coorkern.engine.files`, :mod:`~coorkern.engine.overlays`
  -- what a run folder holds: checkpoints, atomically written files, overlay PNGs;
* :mod:`~coorkern.engine.profiles`, :mod:`~coorkern.engine.config`, :mod:`~coorkern.engine.cli_args`,
  :mod:`~coorkern.engine.tensorboard` -- training defaults, ``--config`` files, the commands' shared
  argparse pieces, TensorBoard logging.

No command imports another command; what two commands share lives here.
"""
