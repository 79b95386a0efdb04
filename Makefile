# Developer entry points. CI runs `bash .ci/run` (the README's test command); these are shortcuts.
PYTHON ?= python3
REGISTRY ?= ghcr.io/pgwarden
TAG ?= $(shell $(PYTHON) -c "import tomllib;print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])")
# real helm and kubectl from the shared tools beside the checkout, when they are there
K8S_TOOLS := $(shell [ -x ../shared/tools/k8s-tools ] && ../shared/tools/k8s-tools 2>/dev/null)
export PATH := $(if $(K8S_TOOLS),$(K8S_TOOLS):,)$(PATH)

.PHONY: test e2e lint-chart images lock crd-reference

test:
	$(PYTHON) -m pytest

# kind cluster, images, chart, examples, then the checks of e2e/run.sh and e2e/test_kind.py
e2e:
	KEEP=1 bash e2e/run.sh setup
	bash e2e/run.sh prove
	PGWARDEN_E2E=1 KEEP=$(KEEP) $(PYTHON) -m pytest e2e -v

lint-chart:
	helm lint --strict charts/pgwarden
	helm lint --strict charts/pgwarden --set webhook.certManager.enabled=true --set networkPolicy.enabled=true
	$(PYTHON) -m pytest tests/test_chart_render.py -q
	hadolint Dockerfile.proxy Dockerfile.operator

images:
	docker build -f Dockerfile.operator -t $(REGISTRY)/pgwarden-operator:$(TAG) .
	docker build -f Dockerfile.proxy -t $(REGISTRY)/pgwarden-proxy:$(TAG) .

# re-pin the images' dependencies (pip-tools), then check the install step still works
lock:
	CUSTOM_COMPILE_COMMAND="make lock" pip-compile -q --strip-extras --annotation-style=line --no-emit-index-url --no-emit-find-links \
	  --output-file requirements/runtime.lock pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" pip-compile -q --strip-extras --annotation-style=line --no-emit-index-url --no-emit-find-links \
	  -c requirements/runtime.lock --output-file requirements/proxy.lock requirements/proxy.in
	$(PYTHON) -m pytest tests/test_images_build.py -q

crd-reference:
	$(PYTHON) docs/gen_crd_reference.py
