"""The generated CRD: up to date in crds/ and in the chart, structural, documented."""

from pathlib import Path

import yaml

from deltafleet.operator import crdgen

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / crdgen.FILE_NAME
CHART_COPY = ROOT / "charts/deltafleet/files/crds" / crdgen.FILE_NAME
REGENERATE = "run: make crds (deltafleet crds --out crds/ --out charts/deltafleet/files/crds/)"


def walk(node, path="openAPIV3Schema"):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}[*]")


def schema():
    return crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crds_folder_matches_the_models():
    assert CRD_FILE.read_text() == crdgen.render(), f"crds/ is stale: {REGENERATE}"


def test_chart_copy_matches_crds_folder():
    assert CHART_COPY.read_text() == CRD_FILE.read_text(), f"the chart's CRD copy is stale: {REGENERATE}"


def test_cli_prints_and_writes(tmp_path, capsys):
    assert crdgen.main([]) == 0
    assert capsys.readouterr().out == crdgen.render()
    assert crdgen.main(["--out", str(tmp_path / "x"), "--out", str(tmp_path / "y")]) == 0
    assert (tmp_path / "x" / crdgen.FILE_NAME).read_text() == crdgen.render()
    assert (tmp_path / "y" / crdgen.FILE_NAME).read_text() == crdgen.render()
    (tmp_path / "file").write_text("")
    assert crdgen.main(["--out", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_schema_is_structural_and_every_field_is_documented():
    for path, node in walk(schema()):
        assert "$ref" not in node and "allOf" not in node and "oneOf" not in node and "nullable" not in node, path
        assert "title" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, f"{path}: anyOf outside int-or-string"
        if "properties" in node:
            assert "additionalProperties" not in node, path
            for name, child in node["properties"].items():
                if f"{path}.{name}" != "openAPIV3Schema.metadata":
                    assert child.get("description"), f"{path}.{name} has no description"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not node.get("x-kubernetes-preserve-unknown-fields"), f"{path}: unknown fields preserved"


def test_identity_and_cross_field_rules_are_in_the_schema():
    spec = schema()["properties"]["spec"]["properties"]
    rules = lambda node: [v["rule"] for v in node.get("x-kubernetes-validations", [])]  # noqa: E731
    assert "self == oldSelf" in rules(spec["baseModel"])
    assert "self == oldSelf" not in rules(spec["fineTunedModel"]), "a new fine-tune checkpoint is a new generation, not a new object"
    assert "self == oldSelf" in rules(spec["serving"]["properties"]["modelName"])
    assert "self == oldSelf" in rules(spec["serving"]["properties"]["pool"])
    assert any(r.endswith("self.minReplicas <= self.maxReplicas") for r in rules(spec["serving"]))
    assert any("has(self.huggingFace) != has(self.path)" == r for r in rules(spec["baseModel"]))
    assert spec["compression"]["default"] == {} and spec["serving"]["default"] == {}
    assert spec["deletionPolicy"]["enum"] == ["Delete", "Retain"]
    assert spec["compression"]["properties"]["lr"]["exclusiveMinimum"] is True


def test_names_columns_and_subresources():
    crd = yaml.safe_load(CRD_FILE.read_text())
    names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "finetunes.deltafleet.dev" and crd["spec"]["scope"] == "Namespaced"
    assert names["shortNames"] == ["ft"] and "all" not in names["categories"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c.get("priority", 0) for c in version["additionalPrinterColumns"]}
    assert [n for n, p in columns.items() if p == 0] == ["Ready", "Phase", "Base", "Age"]
    assert {"Pool", "Fidelity", "Ratio", "Endpoint"} <= {n for n, p in columns.items() if p == 1}


def test_crd_object_validates_against_the_kubernetes_schema():
    import kubernetes_validate

    from cluster.binaries import kube_minor_schema

    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), kube_minor_schema(), strict=True)


def test_generator_refuses_what_a_crd_cannot_say():
    import pytest
    from pydantic import BaseModel, Field

    class Undocumented(BaseModel):
        steps: int = 3

    class Union(BaseModel):
        value: int | list[int] = Field(0, description="either")

    with pytest.raises(crdgen.SchemaError, match=r"x\.steps: has no description"):
        crdgen.model_schema(Undocumented, "x")
    with pytest.raises(crdgen.SchemaError, match=r"x\.value: a union of types is not structural"):
        crdgen.model_schema(Union, "x")
