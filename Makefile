# The two commands of the README's quick start:
#   make demo   installs the package and runs the CPU demo (pretrained base → RPO → held-out eval)
#   make test   installs the package with its test extra and runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: demo test install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: setup.py | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py | $(PY)
	$(PIP) install -q -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m arr_jax.demo $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) runs *.egg-info
