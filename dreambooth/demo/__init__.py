"""The built-in tiny model's world: `dreambooth demo`, its synthetic data, its judge and fidelity scores.

run.py: the demo run (`run_demo`); settings.py: its model, prompts and settings; synthetic.py: the shapes
world the tiny model was pretrained on and the demo subject; fidelity.py: the judge and the scores (also
`python -m dreambooth.demo.fidelity`). Nothing is imported here, so that the synthetic world or the judge
load without the training stack. The core never imports this package (tests/test_layers.py).
"""
