"""`python -m simpo.demo`: see simpo.demo.run."""

from simpo.demo.run import main

if __name__ == "__main__":
    main()
