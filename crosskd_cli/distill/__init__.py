"""The method: the distiller and its cross-head forward, KD terms, pair checks, the preset check
against the zoo, the paper's Fig. 2 and Fig. 5 code, inspection.
"""
