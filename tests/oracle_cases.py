"""The oracle cases: recipes (templates over the tiny family) that tests compare against mergekit."""

# {base}, {math}, {code}, {know} are replaced by the tiny family's absolute paths.
DETERMINISTIC = {
    "linear_gradients_filters": """
        merge_method: linear
        models:
          - model: {math}
            parameters:
              weight: [{{filter: self_attn, value: [0.2, 0.9]}}, {{filter: mlp, value: 0.7}}, {{value: 0.4}}]
          - model: {code}
            parameters: {{weight: [1.0, 0.1, 0.6]}}
          - model: {know}
            parameters: {{weight: 0.3}}
        dtype: float32
    """,
    "linear_unnormalized_with_base": """
        merge_method: linear
        base_model: {base}
        models:
          - model: {base}
            parameters: {{weight: 0.5}}
          - model: {math}
            parameters: {{weight: 0.8}}
          - model: {code}
            parameters: {{weight: -0.3}}
        parameters: {{normalize: false}}
        dtype: float32
    """,
    "slerp_slices_filters": """
        merge_method: slerp
        base_model: {base}
        slices:
          - sources:
              - model: {base}
                layer_range: [0, 4]
              - model: {math}
                layer_range: [0, 4]
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
    """,
    "slerp_near_parallel": """
        merge_method: slerp
        base_model: {base}
        models:
          - model: {base}
          - model: {know}
        parameters: {{t: 0.35}}
        dtype: float32
    """,
    "nuslerp_with_base": """
        merge_method: nuslerp
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.7}}
          - model: {code}
            parameters: {{weight: [0.3, 1.0]}}
        dtype: float32
    """,
    "nuslerp_rowwise_no_base": """
        merge_method: nuslerp
        models:
          - model: {math}
            parameters: {{weight: 1.0}}
          - model: {know}
            parameters: {{weight: 2.0}}
        parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
        dtype: float32
    """,
    "nuslerp_columns_no_base": """
        merge_method: nuslerp
        models:
          - model: {math}
            parameters: {{weight: 1.0}}
          - model: {code}
            parameters: {{weight: 0.5}}
        parameters: {{nuslerp_flatten: false}}
        dtype: float32
    """,
    "multislerp_with_base": """
        merge_method: multislerp
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.5}}
          - model: {code}
            parameters: {{weight: 0.3}}
          - model: {know}
            parameters: {{weight: [0.2, 0.8]}}
        dtype: float32
    """,
    "multislerp_no_base": """
        merge_method: multislerp
        models:
          - model: {math}
            parameters: {{weight: 1}}
          - model: {code}
            parameters: {{weight: 2}}
        parameters: {{normalize_weights: false}}
        dtype: float32
    """,
    "karcher": """
        merge_method: karcher
        models:
          - model: {math}
          - model: {code}
          - model: {know}
        parameters: {{max_iter: 20, tol: 1.0e-6}}
        dtype: float32
    """,
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: [0.2, 1.0, 0.4]}}
          - model: {code}
            parameters: {{weight: 0.6}}
          - model: {know}
            parameters: {{weight: [{{filter: mlp, value: 0.9}}, {{value: -0.2}}]}}
        parameters: {{lambda: 0.8}}
        dtype: float32
    """,
    "task_arithmetic_normalized": """
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.5}}
          - model: {code}
            parameters: {{weight: 0.25}}
        parameters: {{normalize: true, lambda: 1.3}}
        dtype: float32
    """,
    "ties": """
        merge_method: ties
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: [0.3, 1.0], density: [0.2, 0.9]}}
          - model: {code}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {know}
            parameters:
              weight: 0.7
              density: [{{filter: self_attn, value: 0.3}}, {{value: 0.6}}]
        parameters: {{int8_mask: true}}
        dtype: float32
    """,
    "ties_unnormalized_lambda": """
        merge_method: ties
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 1.0, density: 0.4}}
          - model: {code}
            parameters: {{weight: 1.0, density: 0.4}}
        parameters: {{normalize: false, lambda: 0.5}}
        dtype: float32
    """,
    "breadcrumbs": """
        merge_method: breadcrumbs
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.6, density: 0.8, gamma: 0.05}}
          - model: {know}
            parameters: {{weight: 0.4, density: [0.9, 0.5], gamma: 0.02}}
        dtype: float32
    """,
    "breadcrumbs_ties_rescaled": """
        merge_method: breadcrumbs_ties
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.6, density: 0.7, gamma: 0.1}}
          - model: {code}
            parameters: {{weight: 0.5, density: 0.9}}
          - model: {know}
            parameters: {{weight: 0.4, density: 0.6}}
        parameters: {{rescale: true, normalize: true}}
        dtype: float32
    """,
    "sce": """
        merge_method: sce
        base_model: {base}
        models:
          - model: {math}
          - model: {code}
          - model: {know}
        parameters: {{select_topk: 0.4}}
        dtype: float32
    """,
    "sce_all": """
        merge_method: sce
        base_model: {base}
        models:
          - model: {math}
          - model: {know}
        dtype: float32
    """,
    "model_stock": """
        merge_method: model_stock
        base_model: {base}
        models:
          - model: {math}
          - model: {code}
          - model: {know}
        dtype: float32
    """,
    "model_stock_filter_wise": """
        merge_method: model_stock
        base_model: {base}
        models:
          - model: {math}
          - model: {know}
        parameters: {{filter_wise: true}}
        dtype: float32
    """,
    "nearswap": """
        merge_method: nearswap
        base_model: {base}
        models:
          - model: {math}
        parameters: {{t: [0.0005, 0.003]}}
        dtype: float32
    """,
    "arcee_fusion": """
        merge_method: arcee_fusion
        base_model: {base}
        models:
          - model: {code}
        dtype: float32
    """,
    "ram": """
        merge_method: ram
        base_model: {base}
        models:
          - model: {math}
          - model: {code}
          - model: {know}
        parameters: {{epsilon: 0.0005}}
        dtype: float32
    """,
    "ramplus_tl": """
        merge_method: ramplus_tl
        base_model: {base}
        models:
          - model: {math}
          - model: {code}
        parameters: {{epsilon: 0.0003, r: 0.5, alpha: 0.4}}
        dtype: float32
    """,
    "passthrough_stack": """
        merge_method: passthrough
        slices:
          - sources:
              - model: {base}
                layer_range: [0, 3]
          - sources:
              - model: {math}
                layer_range: [1, 4]
                parameters:
                  scale: [{{filter: o_proj, value: 0.5}}, {{filter: down_proj, value: [0.2, 1.0]}}, {{value: 1.0}}]
          - sources:
              - model: {code}
                layer_range: [3, 4]
        dtype: float32
    """,
    "precedence_source_slice_global": """
        merge_method: task_arithmetic
        base_model: {base}
        slices:
          - sources:
              - model: {base}
                layer_range: [0, 2]
              - model: {math}
                layer_range: [0, 2]
                parameters: {{weight: [{{filter: q_proj, value: 2.0}}]}}
              - model: {code}
                layer_range: [0, 2]
            parameters: {{weight: [{{filter: mlp, value: 0.5}}], lambda: 0.7}}
          - sources:
              - model: {base}
                layer_range: [2, 4]
              - model: {math}
                layer_range: [2, 4]
              - model: {code}
                layer_range: [2, 4]
                parameters: {{weight: [0.1, 0.9]}}
        parameters: {{weight: 0.3, lambda: 1.2}}
        dtype: float32
    """,
}

RANDOM = {
    "dare_linear": """
        merge_method: dare_linear
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.6, density: 0.4}}
          - model: {know}
            parameters: {{weight: 0.4, density: 0.7}}
        dtype: float32
    """,
    "dare_ties": """
        merge_method: dare_ties
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {code}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {know}
            parameters: {{weight: 0.4, density: 0.5}}
        dtype: float32
    """,
    "della": """
        merge_method: della
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.6, density: 0.5, epsilon: 0.2}}
          - model: {know}
            parameters: {{weight: 0.4, density: 0.5}}
        dtype: float32
    """,
    "della_linear": """
        merge_method: della_linear
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.7, density: 0.4, epsilon: 0.1}}
          - model: {know}
            parameters: {{weight: 0.3, density: 0.6}}
        parameters: {{lambda: 0.9}}
        dtype: float32
    """,
}
