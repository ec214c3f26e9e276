//! Derive macros for steadfast. Use them through the `steadfast` crate, which re-exports
//! them: `use steadfast::Message;`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned};
use syn::{Data, DeriveInput, Fields, LitStr, parse_macro_input, spanned::Spanned};

/// Derives `steadfast::Message`.
///
/// - `#[message(name = "orders.placed")]` on the type: the wire name (required), dot-
///   separated tokens of ASCII letters, digits, `_` and `-`.
/// - `#[message(key)]` on at most one field: the idempotency key. Its type must implement
///   `steadfast::message::MessageKey` (strings, integers, UUIDs).
/// - `#[message(name = "...", schema)]`: the message's JSON Schema for AsyncAPI comes from
///   `schemars::JsonSchema`, which the type must derive too (steadfast feature `asyncapi`).
#[proc_macro_derive(Message, attributes(message))]
pub fn derive_message(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let mut name: Option<LitStr> = None;
    let mut schema = false;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("message")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                if name.is_some() {
                    return Err(meta.error("duplicate `name`"));
                }
                let lit: LitStr = meta.value()?.parse()?;
                if let Err(why) = check_name(&lit.value()) {
                    return Err(syn::Error::new(lit.span(), why));
                }
                name = Some(lit);
                Ok(())
            } else if meta.path.is_ident("schema") {
                schema = true;
                Ok(())
            } else if meta.path.is_ident("key") {
                Err(meta.error("`key` belongs on a field: put `#[message(key)]` on the field that is the idempotency key"))
            } else {
                Err(meta.error("unknown `message` attribute; expected `name = \"...\"` or `schema`"))
            }
        })?;
    }
    let Some(name) = name else {
        return Err(syn::Error::new(
            Span::call_site(),
            "missing `#[message(name = \"...\")]`: every message needs a wire name such as \"orders.placed\"",
        ));
    };

    let key_fn = key_method(input)?;
    // `schema`: the JSON Schema comes from `schemars::JsonSchema`, derived beside
    // `Message` by the user; needs steadfast's `asyncapi` feature.
    let schema_fn = if schema {
        quote! {
            fn json_schema() -> ::core::option::Option<::steadfast::__private::JsonValue> {
                ::core::option::Option::Some(::steadfast::asyncapi::schema_of::<Self>())
            }
        }
    } else {
        quote!()
    };
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::steadfast::Message for #ident #ty_generics #where_clause {
            const NAME: &'static str = #name;
            #key_fn
            #schema_fn
        }
    })
}

fn key_method(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let fields = match &input.data {
        Data::Struct(s) => Some(&s.fields),
        _ => None,
    };
    let mut key: Option<(TokenStream2, &syn::Type, Span)> = None;
    let check_attrs = |attrs: &[syn::Attribute],
                       member: Option<TokenStream2>,
                       ty: &'_ syn::Type|
     -> syn::Result<Option<(TokenStream2, Span)>> {
        let mut found = None;
        for attr in attrs.iter().filter(|a| a.path().is_ident("message")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("key") {
                    if member.is_none() {
                        return Err(
                            meta.error("`#[message(key)]` is only allowed on fields of a struct")
                        );
                    }
                    found = Some((member.clone().unwrap_or_default(), meta.path.span()));
                    Ok(())
                } else {
                    Err(meta.error("unknown `message` attribute on a field; expected `key`"))
                }
            })?;
        }
        let _ = ty;
        Ok(found)
    };
    match fields {
        Some(fields) => {
            for (i, f) in fields.iter().enumerate() {
                let member = match (&f.ident, fields) {
                    (Some(id), _) => quote!(#id),
                    (None, Fields::Unnamed(_)) => {
                        let idx = syn::Index::from(i);
                        quote!(#idx)
                    }
                    _ => unreachable!("unit structs have no fields"),
                };
                if let Some((member, span)) = check_attrs(&f.attrs, Some(member), &f.ty)? {
                    if key.is_some() {
                        return Err(syn::Error::new(
                            span,
                            "only one field can be `#[message(key)]`",
                        ));
                    }
                    key = Some((member, &f.ty, f.ty.span()));
                }
            }
        }
        None => {
            // Enums: no field may carry a key; reject it on variants' fields.
            if let Data::Enum(e) = &input.data {
                for v in &e.variants {
                    for f in &v.fields {
                        check_attrs(&f.attrs, None, &f.ty)?;
                    }
                }
            }
        }
    }
    Ok(match key {
        None => quote!(),
        Some((member, ty, span)) => {
            // Spanned at the field's type, so "`f64: MessageKey` is not satisfied" points there.
            let as_key = quote_spanned! {span=>
                <#ty as ::steadfast::message::MessageKey>::as_key(&self.#member)
            };
            quote! {
                fn idempotency_key(&self) -> ::core::option::Option<::steadfast::__private::Cow<'_, str>> {
                    ::core::option::Option::Some(#as_key)
                }
            }
        }
    })
}

/// The same rule as `steadfast::message::validate_name`, at compile time.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a message name cannot be empty".into());
    }
    if name.len() > 200 {
        return Err(format!("message name is {} bytes; at most 200", name.len()));
    }
    for token in name.split('.') {
        if token.is_empty() {
            return Err(format!(
                "message name `{name}` has an empty token (leading, trailing or double dot)"
            ));
        }
        if let Some(c) = token
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(format!(
                "message name `{name}` contains `{c}`, which is not valid in a routing key or subject token; use ASCII letters, digits, `_`, `-` and `.`"
            ));
        }
    }
    Ok(())
}
