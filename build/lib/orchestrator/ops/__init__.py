"""Operating a deployment: the deployment file (`deployment`, `deployment_schema`), what
it becomes (real engine configs, launch scripts, Kubernetes manifests), Triton's admin
APIs behind a key and the shared secrets (`access`), and the supervisor that brings dead
python stubs back (`supervisor`). The top layer, with `bench`.

May import: every layer below (not bench).
"""
