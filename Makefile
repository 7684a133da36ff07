# Each target makes its own virtual environment (.venv) on first use; torch is pinned to the
# CPU wheel by constraints.txt.
PY := .venv/bin/python
STAMP := .venv/.installed-stamp
RUN := runs/demo

.PHONY: demo test bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $@

demo: $(STAMP)  ## fit a bank on the digits federation, adapt it to a new 5-way task, predict
	$(PY) -m bench.demo --out $(RUN)
	.venv/bin/protofuse fit $(RUN)/federation/spec.toml --out $(RUN)/bank
	.venv/bin/protofuse adapt $(RUN)/bank --support $(RUN)/federation/support.npz --out $(RUN)/model
	.venv/bin/protofuse predict $(RUN)/model --inputs $(RUN)/federation/test_x.npy --out $(RUN)/pred.npz
	$(PY) -m bench.demo --score $(RUN)

test: $(STAMP)  ## the test suite
	$(PY) -m pytest -q

bench: $(STAMP)  ## the full benchmark (both datasets, all methods); results in bench-results/
	$(PY) -m bench.run --out bench-results

bench-quick: $(STAMP)  ## a smoke run of the benchmark
	$(PY) -m bench.run --datasets digits --seeds 1 --tasks 2 --quick --out bench-results/quick

clean:
	rm -rf runs bench-results .venv
