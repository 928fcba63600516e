# sslab: `make demo` (set up, prepare Fashion-MNIST, short SimCLR pretraining on a local Ray) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   := data/fashion-mnist
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test bench fashion-mnist clean

setup: $(STAMP) fashion-mnist

# re-installs when pyproject.toml changes; pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's disk
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tune]'
	touch $@

# Debian ships Fashion-MNIST as a package; without apt, `sslab data prepare` falls back to torchvision's downloader
fashion-mnist:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) || \
	    echo "sslab: could not apt-get install dataset-fashion-mnist; will try torchvision's downloader"; \
	  else echo "sslab: $(FMNIST) missing and apt unusable; will try torchvision's downloader"; fi; \
	fi

$(DATA)/manifest.json: | $(STAMP) fashion-mnist
	$(VENV)/bin/sslab data prepare fashion-mnist --out $(DATA) --force

demo: setup $(DATA)/manifest.json
	$(VENV)/bin/sslab train simclr --data $(DATA) --preset demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) data runs .pytest_cache
