"""`python -m dreambooth` = the `dreambooth` command."""

from dreambooth.cli import main

if __name__ == "__main__":
    main()
