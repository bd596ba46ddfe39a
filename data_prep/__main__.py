"""`python -m data_prep --input PATH [--input PATH ...] --tokenizer PATH --output DIR [options]`."""

from data_prep.prepare import main

if __name__ == "__main__":  # importing the module (tests/test_imports.py) must not run data prep
    raise SystemExit(main())
