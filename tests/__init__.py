# A regular package, so that `tests.tiny_models` is this folder even where an installed distribution ships a
# top-level `tests` package of its own (latex2sympy2, pulled in by lmms-eval, does).
