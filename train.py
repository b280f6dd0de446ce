"""Entry point: `python train.py {fit,validate,test,evaluate} --config configs/...`."""
from specdiff_train.cli import main

if __name__ == "__main__":
    main()
