#!/usr/bin/env bash
# End-to-end on a real cluster: kind, the two images, the chart, a TLS PostgreSQL, the examples,
# a sample agent — then, through the injected sidecar (kubectl exec), allow, deny, mask, an
# approval with kubectl patch, a credential rotation and the audit trail.
#
#   e2e/run.sh            # setup + prove, then delete the cluster (KEEP=1 keeps it)
#   e2e/run.sh setup      # only create and install (what e2e/test_kind.py calls)
#   e2e/run.sh prove      # only the checks, against the current kubectl context
#   e2e/run.sh down       # delete the kind cluster
#
# Needs docker, kind, kubectl, helm and openssl. `make e2e` runs this and then the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-pgwarden-e2e}
NS=${NS:-pgwarden-system}
TAG=${TAG:-e2e}
# the chart's default: two replicas, one paused by kopf peering; both answer admission requests
# (docs/operating.md, "Two operator replicas"). E2E_OPERATOR_REPLICAS=1 for a smaller cluster.
REPLICAS=${E2E_OPERATOR_REPLICAS:-2}
WORK=${WORK:-$(mktemp -d)}
export KUBECONFIG=${KUBECONFIG:-$WORK/kubeconfig}

log() { printf '\n=== %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

need() {
  for tool in "$@"; do command -v "$tool" >/dev/null || fail "$tool is not installed"; done
}

agent_psql() {  # agent_psql SQL -> psql's output (stdout+stderr), exit code of psql
  # shellcheck disable=SC2016  # $(cat …) and $0 expand inside the agent's shell, not here
  kubectl -n agents exec deploy/cursor-agent -c agent -- sh -c \
    'PGPASSWORD=$(cat /var/run/secrets/pgwarden/token) psql -X -v ON_ERROR_STOP=1 -At -c "$0"' "$1" 2>&1
}

setup() {
  need docker kind kubectl helm openssl
  log "kind cluster $CLUSTER"
  if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config e2e/kind-config.yaml --wait 120s
  fi
  kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG"

  log "images"
  docker build -f Dockerfile.operator -t "pgwarden-operator:$TAG" .
  docker build -f Dockerfile.proxy -t "pgwarden-proxy:$TAG" .
  kind load docker-image --name "$CLUSTER" "pgwarden-operator:$TAG" "pgwarden-proxy:$TAG"

  # namespaces first: nothing the chart or the examples install may precede its namespace
  kubectl create namespace agents --dry-run=client -o yaml | kubectl apply -f -

  log "helm install"
  helm upgrade --install pgwarden charts/pgwarden --namespace "$NS" --create-namespace --wait --timeout 5m \
    --set image.operator.repository=pgwarden-operator --set image.operator.tag="$TAG" \
    --set image.proxy.repository=pgwarden-proxy --set image.proxy.tag="$TAG" \
    --set operator.replicaCount="$REPLICAS" \
    --set operator.rotationCheckInterval=5s --set operator.approvals.checkInterval=2s \
    --set-json 'rbac.reviewers=[{"kind":"Group","name":"dba"}]'

  log "PostgreSQL (orders-db.prod.svc, TLS with the e2e CA)"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=pgwarden-e2e-ca" \
    -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=orders-db.prod.svc" -keyout "$WORK/db.key" -out "$WORK/db.csr" 2>/dev/null
  printf 'subjectAltName=DNS:orders-db.prod.svc,DNS:orders-db.prod.svc.cluster.local\n' > "$WORK/san.ext"
  openssl x509 -req -in "$WORK/db.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial -days 2 \
    -extfile "$WORK/san.ext" -out "$WORK/db.crt" 2>/dev/null
  kubectl create namespace prod --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n prod create secret tls orders-db-tls --cert="$WORK/db.crt" --key="$WORK/db.key" \
    --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n prod create configmap orders-db-shop --from-file=shop.sql=pgwarden/demo/shop.sql \
    --dry-run=client -o yaml | kubectl apply -f -
  kubectl apply -f e2e/manifests/postgres.yaml
  kubectl -n prod rollout status deploy/orders-db --timeout=180s

  log "the examples"
  kubectl create namespace agents --dry-run=client -o yaml | kubectl apply -f -
  kubectl apply -f examples/database-connection.yaml
  # the example's comment: replace the placeholder admin Secret with one carrying the server's CA
  kubectl -n agents create secret generic orders-db-admin --from-literal=username=pgwarden_admin \
    --from-literal=password=change-me --from-file=sslrootcert="$WORK/ca.crt" --dry-run=client -o yaml \
    | kubectl apply -f -
  kubectl apply -f examples/access-policy.yaml -f examples/masking-rule.yaml
  kubectl -n agents wait databaseconnection/orders-prod --for=jsonpath='{.status.phase}'=Ready --timeout=180s

  log "the agent, annotated"
  kubectl apply -f examples/agent-deployment.yaml
  kubectl -n agents annotate deployment cursor-agent pgwarden.dev/inject=orders-prod --overwrite
  kubectl -n agents rollout status deploy/cursor-agent --timeout=180s
  # the pods from before the annotation must be gone: every pod left has the sidecar
  for _ in $(seq 90); do
    if ! kubectl -n agents get pods -l app=cursor-agent \
        -o jsonpath='{range .items[*]}{.metadata.name}:{.spec.initContainers[*].name}{"\n"}{end}' \
        | grep -v pgwarden-proxy | grep -q .; then break; fi
    sleep 2
  done
  kubectl -n agents get pods -l app=cursor-agent \
    -o jsonpath='{range .items[*]}{.metadata.name}:{.spec.initContainers[*].name}{"\n"}{end}' \
    | grep -v pgwarden-proxy | grep -q . && fail "uninjected cursor-agent pods are still running"
  return 0
}

epoch() { date -d "$1" +%s; }

prove() {
  need kubectl
  local out

  log "injected: the proxy is a native sidecar, the agent holds no password"
  pod=$(kubectl -n agents get pods -l app=cursor-agent --field-selector=status.phase=Running \
    -o jsonpath='{.items[0].metadata.name}')
  kubectl -n agents get pod "$pod" -o jsonpath='{.spec.initContainers[0].name} {.spec.initContainers[0].restartPolicy}' \
    | grep -qx 'pgwarden-proxy Always' || fail "no native pgwarden-proxy sidecar in $pod"
  if kubectl -n agents exec "$pod" -c agent -- sh -c 'ls /etc/pgwarden 2>/dev/null; env' | grep -qi 'password'; then
    fail "the agent container can see database credentials"
  fi

  log "allow"
  out=$(agent_psql "select count(*) from orders") || fail "allowed SELECT failed: $out"
  [ "$out" = 20 ] || fail "expected 20 orders, got: $out"

  log "deny"
  out=$(agent_psql "select ssn from customers") && fail "SELECT ssn was not denied: $out"
  grep -q '42501\|permission denied\|no-pii-table' <<<"$out" || fail "unexpected denial: $out"

  log "mask"
  out=$(agent_psql "select email from customer_contacts where id = 1") || fail "masked SELECT failed: $out"
  [ "$out" != "ada@example.com" ] || fail "email came back in clear"
  grep -q '\*' <<<"$out" || fail "email not masked: $out"

  log "approve with kubectl patch"
  agent_psql "update orders set status = 'paid' where id = 1" > "$WORK/update.out" &
  held=$!
  name=""
  for _ in $(seq 60); do
    name=$(kubectl -n agents get approvalrequests -o jsonpath='{.items[?(@.status.phase=="Pending")].metadata.name}' \
      | awk '{print $1}')
    [ -n "$name" ] && break
    sleep 1
  done
  [ -n "$name" ] || fail "no pending ApprovalRequest appeared"
  # the agent itself can never decide
  if kubectl -n agents patch approvalrequest "$name" --type merge -p '{"spec":{"decision":"approved"}}' \
      --as=system:serviceaccount:agents:cursor-agent 2>/dev/null; then
    fail "the agent's service account approved its own request"
  fi
  kubectl -n agents patch approvalrequest "$name" --type merge -p '{"spec":{"decision":"approved"}}' \
    --as=alice@example.com --as-group=dba --as-group=system:authenticated
  wait "$held" || fail "the approved statement failed: $(cat "$WORK/update.out")"
  kubectl -n agents get approvalrequest "$name" -o jsonpath='{.status.decidedBy}' | grep -q alice \
    || fail "decidedBy does not name the approver"
  kubectl -n prod exec deploy/orders-db -- psql -U postgres -d orders -Atc "select status from orders where id = 1" \
    | grep -qx paid || fail "the approved UPDATE did not run"

  log "credential rotation"
  before=$(kubectl -n agents get databaseconnection orders-prod -o jsonpath='{.status.credentials.version}')
  role_before=$(kubectl -n agents get databaseconnection orders-prod -o jsonpath='{.status.credentials.activeRole}')
  # the shortest interval the CRD accepts (gracePeriod >= 2m, < rotationInterval)
  kubectl -n agents patch databaseconnection orders-prod --type merge \
    -p '{"spec":{"credentials":{"rotationInterval":"3m","gracePeriod":"2m"}}}'
  # timed by the operator's own schedule: the rotation is due at status.credentials.nextRotationAt
  # (after the reconcile of the new interval), then seen within rotationCheckInterval (5s)
  sleep 10
  due=$(epoch "$(kubectl -n agents get databaseconnection orders-prod -o jsonpath='{.status.credentials.nextRotationAt}')")
  after=$before
  while [ "$(date +%s)" -lt $((due + 60)) ]; do
    after=$(kubectl -n agents get databaseconnection orders-prod -o jsonpath='{.status.credentials.version}')
    [ "$after" -gt "$before" ] && break
    agent_psql "select 1" >/dev/null || fail "a query failed while waiting for the rotation"
    sleep 3
  done
  [ "$after" -gt "$before" ] || fail "no rotation by nextRotationAt + 60s (version $before)"
  role_after=$(kubectl -n agents get databaseconnection orders-prod -o jsonpath='{.status.credentials.activeRole}')
  [ "$role_after" != "$role_before" ] || fail "the active role did not change"
  # through the grace period queries keep working (kubelet brings the new Secret), and after
  # status.credentials.graceEndsAt the old role is retired
  grace_end=$(epoch "$(kubectl -n agents get databaseconnection orders-prod -o jsonpath='{.status.credentials.graceEndsAt}')")
  while [ "$(date +%s)" -lt $((grace_end + 60)) ]; do
    out=$(agent_psql "select count(*) from orders") || fail "query during the grace period failed: $out"
    if kubectl -n prod exec deploy/orders-db -- psql -U postgres -d orders -Atc \
        "select rolcanlogin from pg_roles where rolname = '$role_before'" | grep -qx f; then break; fi
    sleep 5
  done
  kubectl -n prod exec deploy/orders-db -- psql -U postgres -d orders -Atc \
    "select rolcanlogin from pg_roles where rolname = '$role_before'" | grep -qx f \
    || fail "the retired role $role_before can still log in after graceEndsAt + 60s"
  out=$(agent_psql "select count(*) from orders") || fail "query after rotation failed: $out"

  log "no Kubernetes token in the agent pod (automountServiceAccountToken: false), approvals still work"
  kubectl -n agents get pod "$pod" -o jsonpath='{.spec.volumes[*].name}' | grep -q kube-api-access \
    && fail "the agent pod has an automounted API token"
  { kubectl -n agents auth can-i list approvalrequests --as=system:serviceaccount:agents:cursor-agent || true; } \
    | grep -qx no || fail "the agent's service account may list ApprovalRequests"

  log "a forged decision by someone who may patch is refused by the webhook"
  kubectl apply -f - <<'YAML'
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: e2e-patcher, namespace: agents}
rules:
- {apiGroups: [pgwarden.dev], resources: [approvalrequests], verbs: [get, list, patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: e2e-patcher, namespace: agents}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: e2e-patcher}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: mallory@example.com}]
YAML
  agent_psql "update orders set status = 'shipped' where id = 3" > "$WORK/update3.out" &
  held=$!
  name=""
  for _ in $(seq 60); do
    name=$(kubectl -n agents get approvalrequests \
      -o jsonpath='{.items[?(@.status.phase=="Pending")].metadata.name}' | awk '{print $1}')
    [ -n "$name" ] && break
    sleep 1
  done
  [ -n "$name" ] || fail "no pending ApprovalRequest for the second update"
  out=$(kubectl -n agents patch approvalrequest "$name" --type merge -p '{"spec":{"decision":"approved"}}' \
    --as=mallory@example.com --as-group=system:authenticated 2>&1) && fail "mallory approved: $out"
  grep -q 'denied the request' <<<"$out" || fail "mallory was stopped by something else than the webhook: $out"
  grep -q 'is not a reviewer' <<<"$out" || fail "unexpected refusal: $out"
  kubectl -n agents patch approvalrequest "$name" --type merge -p '{"spec":{"decision":"denied","reason":"e2e"}}' \
    --as=alice@example.com --as-group=dba --as-group=system:authenticated
  wait "$held" && fail "a denied statement ran"

  log "a Job with the native sidecar completes"
  kubectl -n agents delete job e2e-job --ignore-not-found
  kubectl apply -f - <<'YAML'
apiVersion: batch/v1
kind: Job
metadata: {name: e2e-job, namespace: agents}
spec:
  backoffLimit: 0
  template:
    metadata: {annotations: {pgwarden.dev/inject: orders-prod}}
    spec:
      serviceAccountName: cursor-agent
      restartPolicy: Never
      securityContext: {runAsNonRoot: true, runAsUser: 70, seccompProfile: {type: RuntimeDefault}}
      containers:
      - name: job
        image: postgres:16-alpine
        command: [psql, -X, -v, ON_ERROR_STOP=1, -At, -c, "select count(*) from orders"]
        env: [{name: PGUSER, value: cursor-agent}, {name: PGDATABASE, value: orders}]
        securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
YAML
  kubectl -n agents wait --for=condition=complete job/e2e-job --timeout=240s \
    || fail "the Job with the pgwarden sidecar did not complete"

  log "a pod created while the operator is down is not created without its sidecar"
  kubectl -n "$NS" scale deployment/pgwarden-operator --replicas=0
  kubectl -n "$NS" wait --for=delete pod -l app.kubernetes.io/component=operator --timeout=120s
  out=$(kubectl -n agents run e2e-down --image=postgres:16-alpine --restart=Never \
    --annotations=pgwarden.dev/inject=orders-prod --overrides='{"spec":{"serviceAccountName":"cursor-agent"}}' \
    --command -- sleep 60 2>&1) && fail "an annotated pod was admitted without the operator: $out"
  grep -q 'pgwarden-inject' <<<"$out" || fail "unexpected error: $out"
  kubectl -n agents run e2e-plain --image=postgres:16-alpine --restart=Never --command -- true \
    || fail "an unannotated pod was blocked by the operator's outage"
  kubectl -n agents delete pod e2e-plain --ignore-not-found --wait=false
  kubectl -n "$NS" scale deployment/pgwarden-operator --replicas="$REPLICAS"
  kubectl -n "$NS" rollout status deployment/pgwarden-operator --timeout=180s
  kubectl -n agents run e2e-down --image=postgres:16-alpine --restart=Never \
    --annotations=pgwarden.dev/inject=orders-prod --overrides='{"spec":{"serviceAccountName":"cursor-agent"}}' \
    --command -- sleep 60
  kubectl -n agents get pod e2e-down -o jsonpath='{.spec.initContainers[0].name}' | grep -qx pgwarden-proxy \
    || fail "the pod created after the outage has no sidecar"
  kubectl -n agents delete pod e2e-down --wait=false

  log "audit trail"
  kubectl -n agents logs "$pod" -c pgwarden-proxy > "$WORK/proxy.log"
  for needle in 'select count(\*) from orders' 'select ssn from customers' "update orders set status = 'paid'"; do
    grep -q "$needle" "$WORK/proxy.log" || fail "no audit record for: $needle"
  done
  grep -q '"hash"' "$WORK/proxy.log" || fail "audit records carry no hash chain"
  if grep -q 'ada@example.com' "$WORK/proxy.log"; then fail "a masked value leaked into the audit log"; fi

  log "all checks passed"
}

down() {
  need kind
  kind delete cluster --name "$CLUSTER"
}

case "${1:-all}" in
  setup) setup ;;
  prove) prove ;;
  down) down ;;
  all)
    setup
    if [ -z "${KEEP:-}" ]; then trap down EXIT; fi
    prove
    ;;
  *) fail "usage: $0 [setup|prove|down]" ;;
esac
