"""The GPU check (``benchmarks/gpu_check.py``): r50 training-step and inference figures and a does-it-learn
run of nano, through the pipeline's own trainer, model, criterion and metric code.

Modules: ``data`` (the two small packed sets it reads, made on the pipeline's machine), ``train_bench``
(r50 float-train steps under torchrun), ``infer_bench`` (batch-1 FPS, float and fake-quant),
``learn`` (nano until its train-set mAP passes a target), ``report`` (JSON and table), ``common``
(preset and strategy configs from params.yaml, a repeated dataset, timing statistics).

Everything here imports only what the GPU machines have (torch, torchvision, numpy, OpenCV, scipy,
PyYAML, tqdm, onnxscript): the generator of the data imports the pipeline's packing code lazily.
"""
