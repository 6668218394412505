"""The SPIFFE stage: the workload's identity as SVIDs from the Workload API of a local agent
(SPIRE), watched and rotated in memory, never written to disk. Issuers root their credentials in
it (JWT-SVIDs per audience) and the way out presents and checks X.509-SVIDs."""
