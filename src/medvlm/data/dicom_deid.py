"""DICOM PS3.15 Annex E basic application level confidentiality profile, applied to a pydicom Dataset.

medvlm reads DICOM files only to turn their pixels into an image; it never writes a DICOM file back.
So every attribute the basic profile (PS3.15 Table E.1-1) lists for removal, replacement with a dummy
or with a new UID is simply *deleted* (short ones included: PatientSex, PatientAge ...), as are all
private elements, curve data (50xx) and overlay data and comments (60xx,3000 / 60xx,4000), in nested
sequences too. What stays is what the pixel pipeline needs (Rows, Columns, photometric
interpretation, modality / VOI LUTs ...), none of which the profile lists. pydicom has no
de-identification of its own (only ``remove_private_tags``), hence the explicit list.
"""

from __future__ import annotations

from typing import Any

BASIC_PROFILE_KEYWORDS: tuple[str, ...] = tuple(
    """
AccessionNumber AcquisitionComments AcquisitionContextSequence AcquisitionDate AcquisitionDateTime
AcquisitionDeviceProcessingDescription AcquisitionProtocolDescription AcquisitionTime AcquisitionUID
ActualHumanPerformersSequence AdditionalPatientHistory AddressTrial AdmissionID AdmittingDate
AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime AffectedSOPInstanceUID Allergies
AnnotationGroupDescription Arbitrary AuthorObserverSequence BranchOfService CassetteID
ClinicalTrialCoordinatingCenterName
ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID
ClinicalTrialProtocolName ClinicalTrialSeriesDescription ClinicalTrialSeriesID ClinicalTrialSiteID ClinicalTrialSiteName
ClinicalTrialSponsorName ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ClinicalTrialTimePointDescription
ClinicalTrialTimePointID CommentsOnThePerformedProcedureStep ConceptualVolumeUID
ConfidentialityConstraintOnPatientDataDescription ContainerIdentifier ContentCreatorIdentificationCodeSequence
ContentCreatorName ContentDate ContentSequence ContentTime ContributionDescription CountryOfResidence
CurrentPatientLocation CurveDate CurveTime CustodialOrganizationSequence DataSetTrailingPadding DateOfLastCalibration
DateOfSecondaryCapture DerivationDescription DetectorID DeviceDescription DeviceLabel DeviceSerialNumber DeviceUID
DigitalSignaturesSequence DischargeDiagnosisDescription DistributionAddress DistributionName DoseReferenceUID
EthnicGroup
FailedSOPInstanceUIDList FiducialUID FillerOrderNumberImagingServiceRequest FrameComments FrameOfReferenceUID GantryID
GeneratorID GraphicAnnotationSequence HumanPerformerName HumanPerformerOrganization IconImageSequence
IdentifyingComments
ImageComments ImagePresentationComments ImagingServiceRequestComments Impressions InstanceCreationDate
InstanceCreationTime InstanceCreatorUID InstitutionAddress InstitutionCodeSequence InstitutionName
InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence InsurancePlanIdentification
IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence InterpretationAuthor
InterpretationDiagnosisDescription InterpretationIDIssuer InterpretationRecorder InterpretationText
InterpretationTranscriber IrradiationEventUID IssuerOfAdmissionID IssuerOfPatientID IssuerOfServiceEpisodeID
LargePaletteColorLookupTableUID LongDeviceDescription MAC MediaStorageSOPInstanceUID MedicalAlerts MedicalRecordLocator
MilitaryRank ModifiedAttributesSequence ModifiedImageDescription ModifyingDeviceID ModifyingDeviceManufacturer
NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults Occupation OperatorIdentificationSequence OperatorsName
OrderCallbackPhoneNumber OrderEnteredBy OrderEntererLocation OriginalAttributesSequence OtherPatientIDs
OtherPatientIDsSequence OtherPatientNames OverlayDate OverlayTime PaletteColorLookupTableUID ParticipantSequence
PatientAddress PatientAge PatientAlternativeCalendar PatientBirthDate PatientBirthDateInAlternativeCalendar
PatientBirthName PatientBirthTime PatientBreedDescription PatientComments PatientDeathDateInAlternativeCalendar
PatientID PatientInstitutionResidence PatientInsurancePlanCodeSequence PatientMotherBirthName PatientName
PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference PatientSex
PatientSexNeutered PatientSize PatientSpeciesDescription PatientState PatientTelecomInformation PatientTelephoneNumbers
PatientTransportArrangements PatientWeight PerformedLocation PerformedProcedureStepDescription
PerformedProcedureStepID PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformedStationAETitle
PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence
PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress PersonIdentificationCodeSequence
PersonName PersonTelecomInformation PersonTelephoneNumbers PhysicianApprovingInterpretation
PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence PhysiciansReadingStudyIdentificationSequence
PlacerOrderNumberImagingServiceRequest PlateID PreMedication PregnancyStatus ProcedureStepLabel ProtocolName
ReasonForStudy ReasonForTheImagingServiceRequest ReferencedDigitalSignatureSequence ReferencedFrameOfReferenceUID
ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedImageSequence ReferencedPatientAliasSequence
ReferencedPatientPhotoSequence ReferencedPatientSequence ReferencedPerformedProcedureStepSequence
ReferencedSOPInstanceMACSequence ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedStudySequence
ReferringPhysicianAddress ReferringPhysicianIdentificationSequence ReferringPhysicianName
ReferringPhysicianTelephoneNumbers RegionOfResidence RelatedFrameOfReferenceUID RequestAttributesSequence
RequestedContrastAgent RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID
RequestedProcedureLocation RequestedSOPInstanceUID RequestingPhysician RequestingService ResponsibleOrganization
ResponsiblePerson ResponsiblePersonRole ResultsComments ResultsDistributionListSequence ResultsIDIssuer ReviewerName
ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName ScheduledProcedureStepDescription
ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime ScheduledProcedureStepLocation
ScheduledProcedureStepStartDate ScheduledProcedureStepStartTime ScheduledStationAETitle
ScheduledStationGeographicLocationCodeSequence ScheduledStationName ScheduledStationNameCodeSequence
ScheduledStudyLocation ScheduledStudyLocationAETitle SeriesDate SeriesDescription SeriesInstanceUID SeriesTime
ServiceEpisodeDescription ServiceEpisodeID SmokingStatus SOPInstanceUID SourceImageSequence SourceSerialNumber
SpecialNeeds SpecimenAccessionNumber SpecimenIdentifier SpecimenUID StationAETitle StationName StorageMediaFileSetUID
StudyComments StudyDate StudyDescription StudyID StudyIDIssuer StudyInstanceUID StudyTime
SynchronizationFrameOfReferenceUID TemplateExtensionCreatorUID TemplateExtensionOrganizationUID TextComments TextString
TimeOfLastCalibration TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle
TrackingUID TransactionUID UID VerifyingObserverIdentificationCodeSequence VerifyingObserverName
VerifyingObserverSequence VerifyingOrganization VisitComments
""".split()
)
"""Keywords of the attributes PS3.15 Table E.1-1 (basic profile) removes, blanks or replaces; all deleted here."""

_CURVE_GROUPS = range(0x5000, 0x5100, 2)  # curve data: the whole repeating group
_OVERLAY_GROUPS = range(0x6000, 0x6100, 2)
_OVERLAY_ELEMENTS = (0x3000, 0x4000)  # overlay data, overlay comments


def _profile_tags() -> frozenset[int]:
    from pydicom.datadict import tag_for_keyword

    tags = {tag_for_keyword(kw) for kw in BASIC_PROFILE_KEYWORDS}
    if None in tags:  # a typo in the list would silently keep an attribute: refuse instead
        unknown = [kw for kw in BASIC_PROFILE_KEYWORDS if tag_for_keyword(kw) is None]
        raise RuntimeError(f"unknown DICOM keywords in the de-identification list: {unknown}")
    return frozenset(tags)  # type: ignore[arg-type]


def is_identifying(tag: int) -> bool:
    """True if the basic profile removes the element with this tag (private, listed, curve or overlay data)."""
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 1:  # private
        return True
    if group in _CURVE_GROUPS:
        return True
    if group in _OVERLAY_GROUPS and element in _OVERLAY_ELEMENTS:
        return True
    return tag in _PROFILE_TAG_SET


_PROFILE_TAG_SET = _profile_tags()


def deidentify(ds: Any) -> None:
    """Delete, in place and in nested sequences, every element the basic profile does not keep."""

    def drop(dataset: Any, elem: Any) -> None:
        if is_identifying(int(elem.tag)):
            del dataset[elem.tag]

    ds.walk(drop)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        meta.walk(drop)
