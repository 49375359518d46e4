"""The embedded default's synthetic domain: flat coloured shapes on plain backgrounds, with captions.

`toy.shapes` draws a scene and names it, `toy.photos` writes a photo folder (NAME.png + NAME.txt) that
`prepare_dataset.py --captions-from-txt` turns into a dataset, `toy.classify` reads a scene back from an
image (to check generated samples), `toy.train_base` trains the tiny base model of models/cldm_toy.yaml.
"""
