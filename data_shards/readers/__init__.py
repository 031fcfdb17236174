"""Readers of the real-world formats a build consumes, one module per format family.

``structures`` (PDB / mmCIF via gemmi), ``uniprot`` (flat file, XML), ``fasta``, ``gaf`` (GAF 2.x),
``obo`` (GO OBO 1.2; fixed public API used by evaluation) and ``tables`` (chain table, UniProt
TSV, DeepFRI, SIFTS). Readers stream and never hold more than one entry (or one structure file).
"""
