# Set-up and the two entry points named in README.md.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # the CPU build; install it before anything that depends on torch
	$(PY) -m pip install -q -e ".[export,bench,test,ray]"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/sdexport convert --model tiny --target cpu --out out/tiny-cpu --force
	$(VENV)/bin/runtime generate --model out/tiny-cpu --prompt "a lighthouse at dusk" --steps 20 --seed 42 --out out/tiny.png

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench --preset quick --out bench/results/quick

clean:
	rm -rf out .pytest_cache
