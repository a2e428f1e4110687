"""The FHIR Bulk Data client: `fhir-aibl export` and `fhir-aibl run --bulk` (docs/bulk.md).

`client.BulkClient` speaks the protocol (kick-off, status, manifest, downloads, delete)
through the connector's HTTP seam and authentication (fhir_aibl/fhir/http.py, auth.py);
`export.export_to` runs one export into a folder and checks it against what the rules read;
`command` is the command line; `store` and `incremental` are `run --bulk --incremental`
(the changes since the last complete run merged into whole records, only what changed assessed).
"""
