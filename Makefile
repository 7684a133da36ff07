# Each target makes its own virtual environment (.venv) on first use; torch is pinned to the
# CPU wheel by constraints.txt.
PY := .venv/bin/python
STAMP := .venv/.installed-stamp
RUN := runs/demo

.PHONY: demo test bench bench-main bench-dev bench-robust bench-hidden bench-quick mutation clean

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

# Every table the README quotes comes from one of these; each writes bench-results/<name>/
# (results.md, results.json, accuracy_vs_k.png). Reported runs use seeds 100-102; defaults and
# ablations are chosen on the development seeds 0-2 (bench-dev), which no reported run uses.
BENCH := $(PY) -m bench.run

bench: bench-main bench-dev bench-robust bench-hidden  ## every benchmark table the README quotes

bench-main: $(STAMP)  ## reported seeds: protofuse against every baseline, both datasets, 2- and 5-way
	$(BENCH) --out bench-results/main

bench-dev: $(STAMP)  ## development seeds: ablations of the bank and of adaptation's prior strength
	$(BENCH) --dev --ablations --adapt-variants --no-generative --no-ceiling --out bench-results/dev

bench-robust: $(STAMP)  ## reported seeds, with a poor and an overconfident expert added
	$(BENCH) --robustness --no-generative --no-ceiling --out bench-results/robust

bench-hidden: $(STAMP)  ## reported seeds, label 9 hidden from every expert
	$(BENCH) --hide-label 9 --no-generative --no-ceiling --out bench-results/hidden

# Not part of `make test` or CI: about 20 minutes on 2 cores. Every third mutant (by a hash of its
# name), each run against only the tests that reach the mutated function; bench/mutation.py says how.
# mutmut is pinned exactly: bench/mutation.py draws its sample with mutmut's own generation functions.
mutation: $(STAMP)  ## mutation score of the method's modules; report in bench-results/mutation
	.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt mutmut==3.8.1
	$(PY) -m bench.mutation --sample 3 --out bench-results/mutation

bench-quick: $(STAMP)  ## a smoke run of the benchmark
	$(BENCH) --datasets digits --seeds 100 --tasks 2 --quick --out bench-results/quick

clean:
	rm -rf runs bench-results .venv
