"""robustattr's tests. A regular package: kronfluence 1.0.1 installs a top-level `tests` package of its own, which
would otherwise shadow this one (tests.helpers)."""
