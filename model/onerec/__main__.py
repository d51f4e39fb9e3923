"""``python -m model.onerec train|eval|variants``: the lightweight OneRec's command line (see `train`)."""

from model.onerec.train import main

if __name__ == "__main__":
    main()
