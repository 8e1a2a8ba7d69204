"""ml_collections configs, one file per experiment family.

From the command line: `python main.py --config=configs/NAME.py` (`configs/` in the repository
is a link to this package). From Python (e.g. Colab, after `pip install`):
`from p4q_jax.configs import p4q; config = p4q.get_config()`.
"""
