# Each target makes its own virtual environment (.venv) on first use; torch is pinned to the
# CPU wheel by constraints.txt.
PY := .venv/bin/python
STAMP := .venv/.installed-stamp
RUN := runs/demo
# Flower quiet and offline everywhere: no telemetry, no update check, no per-run dependency
# installation (which would download a CUDA build of torch).
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

.PHONY: demo test test-fast test-integration lint typecheck format protos bench-images bench-service bench-service-load images bench bench-main bench-dev bench-robust bench-hidden bench-tables bench-tables-dev bench-quick bench-hostile bench-privacy bench-faults bench-onnx fuzz mutation clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $@

demo: $(STAMP)  ## simulate the digits federation on Flower, adapt its bank to a new 5-way task, predict
	$(PY) -m bench.demo --out $(RUN)
	.venv/bin/protofuse simulate $(RUN)/federation/spec.toml --out $(RUN)/run
	.venv/bin/protofuse adapt $(RUN)/run --support $(RUN)/federation/support.npz --out $(RUN)/model
	.venv/bin/protofuse predict $(RUN)/model --inputs $(RUN)/federation/test_x.npy --out $(RUN)/pred.npz --unsigned-ok
	$(PY) -m bench.demo --score $(RUN)

# The tiers (tests/unit, tests/integration, tests/deploy; README "Tests" has their measured times).
# The unit tier needs nothing but .venv; the others need what tests/host/setup.sh installs (the
# model servers' .venv-mlserver, nginx, the Docker engine): `make test` runs it first and
# tests/host/teardown.sh after (it stops only a Docker daemon that setup started).
test-fast: $(STAMP)  ## the unit tier: every core module, in-process, under a minute
	$(PY) -m pytest -q -m unit

test-integration: $(STAMP)  ## real SuperLinks and SuperNodes, the gRPC service, model servers, the benchmark
	bash tests/host/setup.sh
	$(PY) -m pytest -q -m integration

test: $(STAMP) lint  ## lint and types, then every tier (what .ci/run runs)
	bash tests/host/setup.sh
	$(PY) -m pytest -q; status=$$?; bash tests/host/teardown.sh; exit $$status

# Lint and types, before the tests in `make test` and CI (and before every commit with pre-commit).
# mypy checks the packages by their installed names: .typecheck/ links protofuse_server to server/
# and protofuse_cli to cli/, which an editable install maps by an import hook mypy cannot follow.
lint: $(STAMP)  ## ruff (lint and format check) and mypy
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	$(MAKE) --no-print-directory typecheck

typecheck: $(STAMP)
	rm -rf .typecheck && mkdir .typecheck
	ln -s ../protofuse ../client_sdk .typecheck/ && ln -s ../server .typecheck/protofuse_server && ln -s ../cli .typecheck/protofuse_cli
	cd .typecheck && ../.venv/bin/mypy --config-file ../pyproject.toml -p protofuse -p client_sdk -p protofuse_server -p protofuse_cli

format: $(STAMP)  ## apply ruff's fixes and format
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

protos: $(STAMP)  ## regenerate protofuse/v1 from protos/ (tests/unit/test_wire.py fails when it is stale)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. protos/protofuse/v1/federation.proto protos/protofuse/v1/bank.proto protos/protofuse/v1/fusion.proto

# Every table the README quotes comes from one of these; each writes bench-results/<name>/
# (results.md, results.json, accuracy_vs_k.png). Reported runs use seeds 100-102; defaults and
# ablations are chosen on the development seeds 0-2 (bench-dev), which no reported run uses.
BENCH := $(PY) -m bench.run

bench: bench-main bench-dev bench-robust bench-hidden bench-tables bench-tables-dev bench-images bench-federated  ## every benchmark table the README quotes

bench-main: $(STAMP)  ## reported seeds: protofuse against every baseline, both datasets, 2- and 5-way
	$(BENCH) --out bench-results/main

bench-dev: $(STAMP)  ## development seeds: ablations of the bank and of adaptation's prior strength
	$(BENCH) --dev --ablations --adapt-variants --no-generative --no-ceiling --out bench-results/dev

bench-robust: $(STAMP)  ## reported seeds, with a poor and an overconfident expert added
	$(BENCH) --robustness --no-generative --no-ceiling --out bench-results/robust

bench-hidden: $(STAMP)  ## reported seeds, label 9 hidden from every expert
	$(BENCH) --hide-label 9 --no-generative --no-ceiling --out bench-results/hidden

# Colour and 64 x 64 versions of the packaged sets on the same episodes as the greyscale ones.
bench-images: $(STAMP)  ## reported seeds, 5-way: colour and 64 x 64 images against greyscale; epoch time against image side
	$(BENCH) --datasets digits digits-colour mnist5k mnist5k-colour mnist5k-64 --ways 5 --no-generative --no-ceiling --no-imitator --out bench-results/images
	$(PY) -m bench.compare bench-results/images digits-colour:digits mnist5k-colour:mnist5k mnist5k-64:mnist5k
	$(PY) -m bench.epoch_time --out bench-results/epoch-time

# Feature vectors: the digit datasets given as flat vectors, and river's image-segmentation table.
bench-tables: $(STAMP)  ## reported seeds: the tabular path (MLP encoder, table augmentation) against every baseline
	$(BENCH) --datasets digits-flat mnist5k-flat segment --no-generative --no-ceiling --out bench-results/tables

bench-tables-dev: $(STAMP)  ## development seeds: the same, and the sweep where the table augmentation's rates were chosen
	$(BENCH) --dev --datasets digits-flat mnist5k-flat segment --no-generative --no-ceiling --out bench-results/tables-dev
	$(PY) -m bench.table_sweep --imitator 0:0 0.1:0 0.2:0 0.5:0 0:0.5 --out bench-results/tables-dev/sweep
	$(PY) -m bench.table_sweep --datasets digits-flat mnist5k-flat --bank 0.2:0 0.2:0.3 0.3:0.3 0.4:0 --imitator 0.5:0 0.7:0 0.5:0.3 --out bench-results/tables-dev/sweep-wide

bench-service: $(STAMP)  ## the adaptation service: latency against in-process adaptation, throughput of 8 callers (MNIST-5k, 5-way, k = 5)
	$(PY) -m bench.service --dataset mnist5k --out bench-results/service

bench-service-load: $(STAMP)  ## the service under hostile load: cost per request, memory of 32 callers mixing valid and worst-case requests for 60 s
	$(PY) -m bench.service_load --dataset mnist5k --out bench-results/service-load

images: $(STAMP)  ## the deployment's images, offline from deploy/wheels (BASE_IMAGE: the base image)
	bash deploy/build-wheelhouse.sh
	docker compose build

# Not part of `make test` or CI: about 40 minutes on 2 cores. Every third mutant (by a hash of its
# name), each run against only the tests that reach the mutated function; bench/mutation.py says how.
# mutmut is pinned exactly: bench/mutation.py draws its sample with mutmut's own generation functions.
mutation: $(STAMP)  ## mutation score of the method, the codecs and the fusion server; report in bench-results/mutation
	.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt mutmut==3.8.1
	$(PY) -m bench.mutation --sample 3 --out bench-results/mutation

# Federated (protofuse simulate) against central (protofuse fit) on MNIST-5k: a shared query pool
# and disjoint private shards; then with the poor and overconfident experts; then 50 clients.
bench-federated: $(STAMP)  ## reported seeds: simulate against fit, paired; robustness; scale
	$(PY) -m bench.federated --out bench-results/federated
	$(PY) -m bench.federated --robust --modes shared --out bench-results/federated-robust
	$(PY) -m bench.scale --clients 50 --rounds 3 --out bench-results/scale
	$(PY) -m bench.scale --clients 50 --rounds 3 --dataset mnist5k --out bench-results/scale-mnist5k

bench-onnx: $(STAMP)  ## ONNX parity of adapted models on every benchmark dataset (onnxruntime against predict_proba)
	$(PY) -m bench.onnx_parity --out bench-results/onnx-parity

bench-hostile: $(STAMP)  ## reported seeds: 1 and 2 of 7 clients attacking (MNIST-5k), paired against the clean federation; trust ranking; the defences' clean-run cost
	$(PY) -m bench.hostile --rounds 10 --out bench-results/hostile

bench-privacy: $(STAMP)  ## reported seeds: a curious server's attacks on one client's round (activation mean, membership, label prior) per privacy mode, and each mode's accuracy; DP federations at epsilon 1000 / 8 / 4 / 1 against central fit
	$(PY) -m bench.privacy --out bench-results/privacy
	for e in 1000 8 4 1; do $(PY) -m bench.federated --modes shared --seeds 100 --dp-epsilon $$e --curve-tasks 1 --out bench-results/privacy-dp/epsilon-$$e || exit 1; done

bench-faults: $(STAMP)  ## kill -9 of each component of a local-process deployment, dropouts, a client joining mid-run: the fault table
	$(PY) -m bench.faults --out bench-results/faults

fuzz: $(STAMP)  ## 10,000 coverage-guided cases (atheris) for each decoder, validator and loader; zero crashes or hangs
	.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[fuzz]"
	$(PY) -m bench.fuzz --runs 10000 --out bench-results/fuzz

bench-quick: $(STAMP)  ## a smoke run of the benchmark
	$(BENCH) --datasets digits --seeds 100 --tasks 2 --quick --out bench-results/quick

clean:
	rm -rf runs bench-results .venv .venv-mlserver
