"""`python -m data_prep --input PATH [--input PATH ...] --tokenizer PATH --output DIR [options]`."""

from data_prep.prepare import main

raise SystemExit(main())
