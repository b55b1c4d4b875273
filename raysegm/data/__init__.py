"""The data stage: synthetic data, discovery and validation, the manifest, preprocessing, Ray Data.

- `synth`: `generate_dataset`, the embedded synthetic dataset in the kaggle_3m layout.
- `io`: `read_image`, `read_mask` for one manifest row; every error names the file and the reason.
- `discover`: `discover`, `assign_splits`, `prepare`, `load_manifest`, `manifest_for`.
- `context`: `with_context`, `read_input`: 2.5D input, a slice with its neighbours as extra channels.
- `preprocess`: `preprocess_image`, `preprocess_mask`, `volume_stats`, the training augmentation.
- `pipeline`: `build_dataset`, the streaming Ray Data pipeline of one split.

Submodules are imported explicitly (`from raysegm.data.discover import prepare`) so that importing one
does not pull in Ray.
"""
